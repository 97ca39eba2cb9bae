"""util/run.py, the run layer the entry scripts share: one spelling of the common flags, one exit code per kind
of failure, stop signals ignored by loader workers (issue 18's run layer, issue 22)."""
import signal
import subprocess
import sys

import pytest

import main_finetune
import main_pretrain_d3p
from conftest import REPO
from d3p.distributed import RankDivergenceError
from util import loader as loader_util, run, stop
from util.data_errors import DatasetError
from util.engine import NonFiniteLossError


@pytest.mark.parametrize("parser", [main_pretrain_d3p.get_args_parser, main_finetune.get_args_parser])
def test_common_flags_have_one_spelling_and_mae_aliases(parser):
    args = parser().parse_args(["--save_ckpt_freq", "3", "--no_pin_mem", "--keep_last", "2", "--print_freq", "5"])
    assert (args.save_every, args.pin_mem, args.keep_last, args.print_freq) == (3, False, 2, 5)
    args = parser().parse_args(["--save_every", "4", "--no-pin_mem", "--local-rank", "1"])
    assert (args.save_every, args.pin_mem, args.local_rank) == (4, False, 1)


def test_checkpoint_defaults_keep_each_recipe():
    pre = main_pretrain_d3p.get_args_parser().parse_args([])
    ft = main_finetune.get_args_parser().parse_args([])
    assert (pre.save_every, pre.keep_last) == (20, 0)  # MAE pre-training: every 20 epochs, all kept
    assert (ft.save_every, ft.keep_last) == (1, 1)  # fine-tuning: every epoch, the newest kept


@pytest.mark.parametrize("argv,message", [
    (["--accum_iter", "0"], "--accum_iter must be >= 1, got 0"),
    (["--clip_grad", "0"], "--clip_grad must be > 0, got 0.0. Fix: leave it out"),
    (["--save_every", "0"], "--save_every must be >= 1, got 0"),
    (["--resume", "{missing}"], "--resume checkpoint {missing} does not exist. Fix:"),
    (["--resume", "{missing}", "--auto_resume"], "--resume and --auto_resume are exclusive. Fix: pick one"),
    (["--precision", "fp16", "--device", "cpu"], "fp16"),
])
def test_shared_flags_are_refused_alike_by_both_scripts(argv, message, tmp_path, capsys):
    """One check (util.flags), one way (ConfigError: exit code 2, the message, no traceback) in both scripts."""
    missing = str(tmp_path / "nope.pth")
    argv = [a.format(missing=missing) for a in argv]
    message = message.format(missing=missing)
    assert main_pretrain_d3p.cli([*argv, "--output_dir", str(tmp_path / "pre")]) == run.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "usage:" not in err
    args = main_finetune.get_args_parser().parse_args([*argv, "--model", "vit_tiny_patch4"])
    main_finetune.resolve_defaults(args)
    with pytest.raises(run.ConfigError) as e:
        main_finetune.validate_args(args)
    assert message in str(e.value)
    assert not (tmp_path / "pre").exists()  # refused before anything was written


def test_shared_flags_have_one_declaration():
    """The training, data and run flags both scripts take come from util/flags.py, with each script's defaults."""
    pre = main_pretrain_d3p.get_args_parser().parse_args([])
    ft = main_finetune.get_args_parser().parse_args([])
    for name in ("batch_size", "accum_iter", "clip_grad", "precision", "compile", "lr", "data_path", "data_set",
                 "download", "jpeg_upsampling", "output_dir", "seed", "num_workers", "pin_mem", "device"):
        assert getattr(pre, name) == getattr(ft, name), name
    assert (pre.epochs, ft.epochs, pre.blr, ft.blr, pre.warmup_epochs, ft.warmup_epochs) == (400, None, 1.5e-4, None, 40,
                                                                                              None)


def test_importing_util_imports_neither_torchvision_nor_timm():
    """The torchvision shim is an explicit call (util.torchvision_compat.ensure_torchvision_importable), not a side
    effect of `import util`; the run-folder names import nothing heavy (util.checkpoint imports them)."""
    code = ("import sys, util, util.run_folder, util.checkpoint; "
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-c", "import sys, util.run_folder; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


@pytest.mark.parametrize("error,code", [
    (run.ConfigError("bad flag. Fix: x"), run.EXIT_USAGE),
    (DatasetError("no images. Fix: y"), run.EXIT_USAGE),
    (NonFiniteLossError("loss is nan"), run.EXIT_FAILED),
    (RankDivergenceError("replicas differ"), run.EXIT_FAILED),
])
def test_one_exit_code_per_kind_of_failure(error, code, capsys):
    def main(args):
        raise error

    assert run.run_main(main, None) == code
    assert f"error (rank 0): {error}" in capsys.readouterr().err


def test_a_stopped_run_returns_its_code():
    assert run.run_main(lambda args: run.EXIT_STOPPED, None) == 143
    assert run.run_main(lambda args: {"acc1": 1.0}, None) == 0


def test_workers_ignore_the_stop_signals_then_run_the_loader_init():
    seen = []
    previous = {sig: signal.getsignal(sig) for sig in stop.stop_signals()}
    try:
        stop.worker_init(then=seen.append)(3)  # what a worker runs first
        assert seen == [3]
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in stop.stop_signals())
        assert {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2} <= set(stop.stop_signals())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_stop_safe_loader_gives_its_workers_the_stop_init_before_the_users():
    """StopSafeDataLoader owns the workers' stop handling: whatever worker_init_fn the caller passes runs after the
    stop signals are ignored and unblocked (a worker is born with them blocked)."""
    import torch
    from torch.utils.data import TensorDataset

    from util.loader import StopSafeDataLoader

    seen = []
    loader = StopSafeDataLoader(TensorDataset(torch.arange(4)), num_workers=2, worker_init_fn=seen.append)
    previous = {sig: signal.getsignal(sig) for sig in stop.stop_signals()}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop.stop_signals())  # as a worker starts
    try:
        loader.worker_init_fn(1)  # what a worker runs first
        assert seen == [1]
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in stop.stop_signals())
        assert not set(stop.stop_signals()) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert StopSafeDataLoader(TensorDataset(torch.arange(4)), worker_init_fn=seen.append).worker_init_fn == seen.append


@pytest.mark.parametrize("workers", [0, 2])
def test_creating_a_loader_iterator_leaves_the_global_rng_alone(workers):
    """A resume creates the (persistent) loaders' iterators at another point of the run than the uninterrupted
    run did: a draw from the global RNG there would shift every later drop-path mask."""
    import argparse

    import torch
    from torch.utils.data import TensorDataset

    from d3p.sampler import PrunedDistributedSampler
    from util.datasets import IndexedDataset

    args = argparse.Namespace(seed=0, num_workers=workers, pin_mem=False, device="cpu")
    data = TensorDataset(torch.arange(8).float().view(8, 1), torch.zeros(8, dtype=torch.long))
    loaders = [loader_util.make_loader(IndexedDataset(data), PrunedDistributedSampler(8, shuffle=False), args, 4, 0),
               loader_util.make_eval_loader(data, range(8), args, 4)]
    for loader in loaders:
        before = torch.get_rng_state()
        assert len(list(loader)) == 2
        assert torch.equal(torch.get_rng_state(), before)


def test_training_loaders_balance_the_batches_and_resume_in_the_same_batches():
    """66 samples at --batch_size 32: 3 batches of 22 (not 32 + 32 + 2); even sizes for Mixup (67: 22, 22, 23);
    MAE's drop_last: 2 x 32. A resume after the first batch yields the rest of the same batches."""
    import argparse

    import torch
    from torch.utils.data import TensorDataset

    from d3p.sampler import PrunedDistributedSampler
    from util.datasets import IndexedDataset

    args = argparse.Namespace(seed=0, num_workers=0, pin_mem=False, device="cpu")

    def sizes(n, **kw):
        data = IndexedDataset(TensorDataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long)))
        sampler = PrunedDistributedSampler(n, shuffle=False)
        loader = loader_util.make_loader(data, sampler, args, 32, 0, **kw)
        return [len(index) for _, _, index in loader], sampler, loader

    assert sizes(66)[0] == [22, 22, 22]
    assert sizes(67, multiple_of=2)[0] == [22, 22, 23]
    assert sizes(66, drop_last=True)[0] == [32, 32]
    _, sampler, loader = sizes(66)
    sampler.skip(22)  # a mid-epoch checkpoint after one step of 22
    assert [index.tolist() for _, _, index in loader] == [list(range(22, 44)), list(range(44, 66))]



def test_an_old_checkpoint_without_samples_done_counts_every_rank():
    """A mid-epoch checkpoint written before samples_done was stored: the positions done are step x batch size x
    the world size that wrote it (2 steps of 32 on 2 ranks: 128), not of one rank; a stored value wins."""
    from util.resume import _samples_done

    written_by = {"world_size": 2, "args": {"batch_size": 32}}
    assert _samples_done({"step": 2}, written_by) == 128
    assert _samples_done({"step": 2}, {"args": {"batch_size": 32}}) == 64  # no world size stored: one rank wrote it
    assert _samples_done({"step": 2, "samples_done": 77}, written_by) == 77
