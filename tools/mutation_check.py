"""Mutation check: does the test suite catch the bugs that would put wrong numbers into a paper table?

    python tools/mutation_check.py                      # every mutation below; prints CAUGHT / SURVIVED each
    python tools/mutation_check.py --only ek_round var_ddof0
    python tools/mutation_check.py --list               # names, files and the tests that should catch each
    python tools/mutation_check.py --tests-ref 7ae5862  # the same mutations against that commit's tests/ (a "before")

Each mutation is a list of exact text substitutions in one file. The repository's files (tracked, plus untracked
ones git does not ignore) are copied into a scratch directory once; for each mutation the substitutions are
applied there, the named tests run (`python -m pytest -x -q`), and the file is restored. The working tree is never
touched. A mutation is
    CAUGHT    the tests failed (pytest exit 1; exit 2 -- an import/collection error -- counts too and is marked),
    SURVIVED  the tests passed: the bug would go unnoticed,
    STALE     a snippet is missing or not unique in the file (the code moved: update MUTATIONS),
    NO TESTS  none of the named tests exists (with --tests-ref: the old suite had no such test).
Before the mutations, the named tests run once unmutated (the baseline); they must pass, else nothing below means
anything (skip with --no-baseline). Exit status 0 when every mutation is CAUGHT.

Not part of CI's default run (it runs the tests once per mutation: ~10-20 minutes on 2 cores). Run it before
resolving an issue that touches the method's numbers, and add a mutation here for every bug class a fix guards.
See docs/mutation_check.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact snippet, replacement); each snippet must occur exactly once
    tests: tuple[str, ...]  # pytest node ids that must fail under the mutation
    why: str  # the bug, in words


def m(name: str, file: str, edits: list[tuple[str, str]], tests: list[str], why: str) -> Mutation:
    return Mutation(name, file, tuple(edits), tuple(tests), why)


STATS = "tests/library/test_d3p_stats.py"
METHOD = "tests/library/test_d3p_method.py"
PRETRAIN = "tests/training/test_pretrain.py"
FINETUNE = "tests/training/test_finetune.py"
FIT = "tests/library/test_d3p_fit.py"
SEAMS = "tests/library/test_library_seams.py"

# ---------------------------------------------------------------------------------------------------------------
# The list. Keep each snippet short but unique in its file; after a refactor, fix the snippets the run reports STALE.
# ---------------------------------------------------------------------------------------------------------------
MUTATIONS: list[Mutation] = [
    # ---- issue 21: the survivors of the first audit --------------------------------------------------------------
    m("ek_round", "d3p/stats.py",
      [("    expected = np.floor(ideal).astype(np.int64)", "    expected = np.round(ideal).astype(np.int64)")],
      [f"{STATS}::test_histogram_match_counts_from_first_principles", f"{STATS}::test_decision_bookkeeping_is_exact",
       f"{STATS}::test_decision_golden_regression"],
      "histogram matching's expected counts e_k rounded instead of floored"),
    m("ek_scale_1.2", "d3p/stats.py",
      [("    ideal = N * density.pdf(centres) * width", "    ideal = 1.2 * N * density.pdf(centres) * width")],
      [f"{STATS}::test_histogram_match_counts_from_first_principles", f"{STATS}::test_decision_bookkeeping_is_exact",
       f"{STATS}::test_decision_golden_regression"],
      "e_k scaled by 1.2"),
    m("ek_scale_0.97", "d3p/stats.py",
      [("    ideal = N * density.pdf(centres) * width", "    ideal = 0.97 * N * density.pdf(centres) * width")],
      [f"{STATS}::test_histogram_match_counts_from_first_principles", f"{STATS}::test_decision_bookkeeping_is_exact",
       f"{STATS}::test_decision_golden_regression"],
      "e_k scaled by 0.97"),
    m("var_ddof0", "d3p/stats.py",
      [("var[t] = float(np.var(row, ddof=1, dtype=np.float64))", "var[t] = float(np.var(row, ddof=0, dtype=np.float64))")],
      [f"{STATS}::test_window_moments_are_the_unbiased_sample_variance", f"{STATS}::test_decision_golden_regression"],
      "window variance with ddof=0 instead of the unbiased ddof=1"),
    m("anneal_ignored_by_plan", "d3p/methods/d3p.py",
      [("if self.schedule.is_annealing(epoch) or not self.pruned.any():", "if not self.pruned.any():"),
       ("if not self.schedule.is_annealing(epoch) and (self.weights != 1).any():", "if (self.weights != 1).any():")],
      [f"{METHOD}::test_anneal_tail_trains_all_data_unweighted_and_records_nothing",
       f"{PRETRAIN}::test_random_matched_to_a_d3p_run_keeps_its_counts"],
      "--d3p_anneal_epochs ignored by the D3P plan: pruning and weights go on through the tail"),
    m("lr_pretrain_no_accum_world", "main_pretrain_d3p.py",
      [("        args.lr = args.blr * eff_batch_size / 256", "        args.lr = args.blr * args.batch_size / 256")],
      [f"{PRETRAIN}::test_one_epoch_pretrain_logs_and_checkpoint"],
      "pre-training lr = blr x batch / 256, ignoring accum_iter x world_size"),
    m("lr_pretrain_no_world", "main_pretrain_d3p.py",
      [("        args.lr = args.blr * eff_batch_size / 256",
        "        args.lr = args.blr * args.batch_size * args.accum_iter / 256")],
      [f"{PRETRAIN}::test_two_process_torchrun_d3p"],
      "pre-training lr ignoring world_size (only a 2-process run can see it)"),
    m("lr_finetune_no_accum_world", "main_finetune.py",
      [("        args.lr = args.blr * eff_batch_size / 256", "        args.lr = args.blr * args.batch_size / 256")],
      ["tests/training/test_finetune.py::test_finetune_one_epoch"],
      "fine-tuning lr = blr x batch / 256, ignoring accum_iter x world_size"),
    m("lr_finetune_no_world", "main_finetune.py",
      [("        args.lr = args.blr * eff_batch_size / 256",
        "        args.lr = args.blr * args.batch_size * args.accum_iter / 256")],
      ["tests/training/test_finetune_prune.py::test_two_process_supervised_pruning"],
      "fine-tuning lr ignoring world_size (only a 2-process run can see it)"),
    m("knn_temperature_fixed", "main_knn.py",
      [("args.k, args.temperature,\n", "args.k, 0.07,\n")],
      ["tests/training/test_knn.py::test_k_and_temperature_flags_reach_the_classifier"],
      "main_knn passes 0.07 instead of --temperature to the classifier"),
    m("knn_k_fixed", "main_knn.py",
      [("args.k, args.temperature,\n", "20, args.temperature,\n")],
      ["tests/training/test_knn.py::test_k_and_temperature_flags_reach_the_classifier"],
      "main_knn passes 20 instead of --k to the classifier"),
    m("no_flip_in_memory", "util/image_transforms.py",
      [("            ops.append(transforms.RandomHorizontalFlip())", "            pass")],
      ["tests/training/test_loader_pipeline.py::test_every_pretraining_pipeline_flips_half_the_crops"],
      "no horizontal flip in the in-memory (CIFAR) pre-training pipeline"),
    m("window_loss_sum", "d3p/methods/d3p.py",
      [("= losses.mean.astype(np.float32)", "= losses.loss_sum.astype(np.float32)")],
      [f"{METHOD}::test_data_pruner_window_holds_every_samples_mean_loss",
       f"{METHOD}::test_decisions_identical_on_two_gloo_ranks"],
      "the D3P window holds each sample's loss sum (padding duplicates doubled) instead of its mean"),
    m("record_drops_forward_only", "d3p/integration.py",
      [("            self.recorder.record(indices, losses)\n            self._forward_recorded = True",
        "            self._forward_recorded = True")],
      [f"{METHOD}::test_data_pruner_window_holds_every_samples_mean_loss",
       f"{METHOD}::test_decisions_identical_on_two_gloo_ranks"],
      "DataPruner.record drops the forward-only losses (pruned samples get NaN in the window)"),
    # ---- issue 21: mutations the weak tests let through ----------------------------------------------------------
    m("finetune_never_steps", "util/engine.py",
      [("parameters=params, update_grad=update)", "parameters=params, update_grad=False)")],
      ["tests/training/test_finetune.py::test_finetune_one_epoch"],
      "fine-tuning never steps the optimizer"),
    m("bf16_runs_fp32", "util/engine.py",
      [("    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)",
        "    return contextlib.nullcontext()")],
      [f"{PRETRAIN}::test_bf16_autocast_on_cpu_trains"],
      "--precision bf16 silently runs in fp32 in pre-training"),
    m("example_never_steps", "examples/train_classifier.py",
      [("            optimizer.step()\n", "            pass\n")],
      ["tests/training/test_example.py::test_example_prunes_and_resumes"],
      "the API example's loop never steps the optimizer"),
    m("unscored_imputed", "d3p/methods/d3p.py",
      [("window = self.window if not unscored else self.window[:, scored]",
        "window = np.where(np.isfinite(self.window), self.window, np.nanmean(self.window, axis=1, keepdims=True))"),
       ("self.pruned[scored] = decision.pruned", "self.pruned = decision.pruned | ~scored"),
       ("self.weights[scored] = decision.weights", "self.weights = np.where(scored, decision.weights, 1).astype(np.float32)")],
      [f"{METHOD}::test_samples_without_a_loss_are_kept_and_counted"],
      "samples without a loss imputed with the epoch mean and decided with the others (changes everyone's e_k)"),
    m("d2_last_epoch_difficulty", "d3p/methods/d2.py",
      [("difficulty = history.mean(axis=0)", "difficulty = history[-1]")],
      ["tests/library/test_static.py::test_d2_strategy_and_resume"],
      "D2's difficulty = the last warm-up epoch's loss instead of the warm-up mean"),
    # ---- a few of the 22 the first audit found caught (kept so they stay caught) -------------------------------
    m("cld_as_mean", "d3p/stats.py",
      [("acc += np.square(row, dtype=np.float64)", "acc += row.astype(np.float64)")],
      [f"{STATS}::test_cld_score_is_mean_square_in_float64"],
      "the CLD as the mean loss instead of the mean squared loss"),
    m("upweights_one", "d3p/stats.py",
      [("ratio[:bins][under] = (target[under] / observed[under]).astype(np.float32)", "ratio[:bins][under] = 1.0")],
      [f"{STATS}::test_decision_bookkeeping_is_exact", f"{STATS}::test_histogram_match_counts_from_first_principles"],
      "under-filled bins not up-weighted (weights 1)"),
    m("one_tail_only", "d3p/stats.py",
      [("    pruned = easy_mask | hard_mask\n", "    pruned = hard_mask.copy()\n")],
      [f"{STATS}::test_decision_bookkeeping_is_exact"],
      "only the hard tail pruned"),
    m("sampler_no_padding", "d3p/sampler.py",
      [("            rest = np.concatenate([rest, np.resize(self._order, total - rest.size)])", "            pass")],
      ["tests/library/test_sampler.py::test_equal_length_cover_and_no_pruned_index"],
      "distributed sampler without padding (ranks step different counts: DDP hangs)"),
    m("weighted_loss_mean", "d3p/integration.py",
      [("        return (weights * per_sample).sum() / weights.sum()", "        return (weights * per_sample).mean()")],
      [f"{PRETRAIN}::test_weighted_batch_loss_rules", f"{PRETRAIN}::test_engine_uses_sample_weights_in_the_gradient"],
      "D3P's weighted loss as mean(w l) instead of sum(w l) / sum(w)"),
    m("rng_not_restored", "util/checkpoint.py",
      [("    set_rng_state(states[get_rank()])", "    pass")],
      [f"{PRETRAIN}::test_resume_equals_straight_run"],
      "RNG states not restored on resume"),
    m("knn_votes_uniform", "main_knn.py",
      [("weights = torch.exp(torch.gather(similarity, 1, order).double() / temperature)",
        "weights = torch.ones_like(torch.gather(similarity, 1, order).double())")],
      ["tests/training/test_knn.py::test_knn_equals_brute_force_reference"],
      "k-NN votes uniform instead of exp(s / T)"),
    m("no_flip_jpeg", "util/image_transforms.py",
      [("flip = self.flip and torch.rand(1).item() < 0.5", "flip = self.flip and torch.rand(1).item() < 0.0")],
      ["tests/training/test_loader_pipeline.py::test_every_pretraining_pipeline_flips_half_the_crops",
       "tests/training/test_loader_pipeline.py::test_crop_scale_and_aspect_histograms_match"],
      "no horizontal flip in the uint8 JPEG crop"),
    m("forward_only_counted_as_trained", "d3p/integration.py",
      [("samples_trained=trained,", "samples_trained=trained + forward_seen,")],
      [f"{PRETRAIN}::test_d3p_end_to_end_prunes_records_and_resumes_mid_cycle"],
      "forward-only samples counted as trained in the cost ledger"),
    # issue 29: the mutants that survived before, and the seams it fixed
    m("finetune_no_flip", "util/image_transforms.py",
      [('hflip=0.0 if data_set == "digits" else 0.5,', "hflip=0.0,")],
      [f"{FINETUNE}::test_finetune_transform_flips_natural_images_half_the_time_and_digits_never"],
      "the fine-tuning transform without MAE's horizontal flip"),
    m("poor_fit_at_threshold", "d3p/stats.py",
      [("poor = bool(ks > fit_threshold)", "poor = bool(ks >= fit_threshold)")],
      [f"{FIT}::test_poor_fit_starts_strictly_above_the_threshold"], "a fit exactly at the threshold called poor"),
    m("samples_done_one_rank", "util/resume.py",
      [("    return int(partial[\"step\"]) * int(saved_args.get(\"batch_size\", 0)) * world",
        "    return int(partial[\"step\"]) * int(saved_args.get(\"batch_size\", 0))")],
      ["tests/training/test_run_layer.py::test_an_old_checkpoint_without_samples_done_counts_every_rank"],
      "an old mid-epoch checkpoint's positions done ignore the world size that wrote it"),
    m("fit_threshold_dropped", "d3p/methods/d3p.py",
      [("poor_fit=d3p_poor_fit, fit_threshold=d3p_fit_threshold,", "poor_fit=d3p_poor_fit,")],
      [f"{FIT}::test_the_fit_threshold_reaches_the_strategy"], "--d3p_fit_threshold never reaches the strategy"),
    m("kept_share_rounded_down", "d3p/methods/d3p.py",
      [("math.ceil(self.min_kept_share * self.num_samples - 1e-9)", "int(self.min_kept_share * self.num_samples)")],
      [f"{FIT}::test_the_kept_share_is_rounded_up"], "the floor's share rounded down"),
    m("unused_indices_allowed", "d3p/integration.py",
      [("                if self._pending_index is not None:\n                    raise",
        "                if False:\n                    raise")],
      [f"{SEAMS}::test_a_batch_whose_indices_were_never_used_is_refused"],
      "a batch whose indices pruner.loss never took goes by silently"),
    m("replicas_without_rank", "d3p/integration.py",
      [("if num_replicas is None and rank is not None or num_replicas is not None and rank is None:", "if False:")],
      [f"{SEAMS}::test_num_replicas_and_rank_come_together"], "num_replicas without rank accepted"),
    m("dropped_samples_pruned", "d3p/methods/d3p.py",
      [("            self.pruned = np.zeros(self.num_samples, dtype=bool)\n            self.pruned[scored]",
        "            self.pruned = ~scored\n            self.pruned[scored]")],
      [f"{SEAMS}::test_a_drop_last_loader_prunes_nothing_it_dropped_and_the_floor_and_ledger_hold"],
      "samples a drop_last loader dropped pruned as unscored"),
    m("ledger_counts_the_sampler", "d3p/integration.py",
      [("samples_trained=trained,", "samples_trained=self.sampler.total_size,")],
      [f"{SEAMS}::test_a_drop_last_loader_prunes_nothing_it_dropped_and_the_floor_and_ledger_hold"],
      "the ledger counts the sampler's length, not the samples trained"),
    m("bins_not_compared", "d3p/methods/d3p.py",
      [("if value is not None and value != now[name]:", "if False:")],
      [f"{SEAMS}::test_a_resume_that_changes_the_decisions_is_refused_naming_the_option"],
      "a resume with other bins, quantile or rails accepted"),
]


# ---------------------------------------------------------------------------------------------------------------
def tracked_files(repo: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(repo, p))]


def make_scratch(repo: str, tests_ref: str | None) -> str:
    scratch = tempfile.mkdtemp(prefix="mutation_check_")
    for rel in tracked_files(repo):
        dst = os.path.join(scratch, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(repo, rel), dst)
    if tests_ref:
        shutil.rmtree(os.path.join(scratch, "tests"))
        archive = subprocess.run(["git", "archive", tests_ref, "tests"], cwd=repo, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", scratch], input=archive.stdout, check=True)
    return scratch


def existing_tests(scratch: str, node_ids: tuple[str, ...]) -> list[str]:
    """The node ids whose file exists and defines the test function (for --tests-ref: the old suite's)."""
    keep = []
    for node in node_ids:
        path, _, func = node.partition("::")
        file = os.path.join(scratch, path)
        if not os.path.isfile(file):
            continue
        name = func.split("[")[0]
        if not name or re.search(rf"^def {re.escape(name)}\(", open(file, encoding="utf-8").read(), re.M):
            keep.append(node)
    return keep


def run_pytest(scratch: str, node_ids: list[str], timeout: int) -> tuple[int | None, float, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *node_ids]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return None, time.time() - start, out
    return proc.returncode, time.time() - start, out


def apply(scratch: str, mut: Mutation) -> str | None:
    """Apply the edits; returns the original text (to restore), or None when a snippet is missing/ambiguous."""
    path = os.path.join(scratch, mut.file)
    if not os.path.isfile(path):
        return None
    original = open(path, encoding="utf-8").read()
    text = original
    for old, new in mut.edits:
        if text.count(old) != 1:
            return None
        text = text.replace(old, new)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--tests-ref", metavar="GIT_REF", help="use tests/ of this commit (e.g. to measure a 'before')")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = p.parse_args(argv)

    names = [mu.name for mu in MUTATIONS]
    assert len(set(names)) == len(names), "mutation names must be unique"
    selected = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"unknown mutation(s) {unknown}; see --list")
        selected = [mu for mu in MUTATIONS if mu.name in args.only]
    if args.list:  # also checks every snippet against the working tree (STALE: update it)
        for mu in selected:
            path = os.path.join(REPO, mu.file)
            text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
            state = "ok" if all(text.count(old) == 1 for old, _ in mu.edits) else "STALE"
            print(f"{mu.name:34s} {state:5s} {mu.file:30s} {mu.why}")
            for t in mu.tests:
                print(f"{'':34s}   {t}")
        return 0

    scratch = make_scratch(REPO, args.tests_ref)
    print(f"scratch copy: {scratch}" + (f" (tests/ from {args.tests_ref})" if args.tests_ref else ""), flush=True)
    try:
        if not args.no_baseline:
            nodes = sorted({t for mu in selected for t in existing_tests(scratch, mu.tests)})
            rc, secs, out = run_pytest(scratch, nodes, args.timeout * 2)
            print(f"baseline ({len(nodes)} tests, unmutated): exit {rc} in {secs:.0f} s", flush=True)
            if rc != 0:
                print(out[-4000:])
                print("the named tests fail without any mutation: fix them first (or pass --no-baseline)")
                return 2
        rows = []
        for mu in selected:
            nodes = existing_tests(scratch, mu.tests)
            if not nodes:
                rows.append((mu, "NO TESTS", 0.0, ""))
                print(f"{mu.name:34s} NO TESTS", flush=True)
                continue
            original = apply(scratch, mu)
            if original is None:
                rows.append((mu, "STALE", 0.0, ""))
                print(f"{mu.name:34s} STALE (a snippet is missing or not unique in {mu.file})", flush=True)
                continue
            try:
                rc, secs, out = run_pytest(scratch, nodes, args.timeout)
            finally:
                with open(os.path.join(scratch, mu.file), "w", encoding="utf-8") as f:
                    f.write(original)
            verdict = {0: "SURVIVED", 1: "CAUGHT", 2: "CAUGHT (collection error)", None: "CAUGHT (timeout)"}.get(
                rc, f"NO TESTS (pytest exit {rc})")
            failed = [line.split(" - ")[0].replace("FAILED ", "") for line in out.splitlines()
                      if line.startswith(("FAILED", "ERROR"))]
            rows.append((mu, verdict, secs, failed[0] if failed else ""))
            print(f"{mu.name:34s} {verdict:10s} {secs:6.0f} s  {failed[0] if failed else ''}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    caught = sum(r[1].startswith("CAUGHT") for r in rows)
    print(f"\n{'mutation':34s} {'verdict':26s} caught by")
    for mu, verdict, _, by in rows:
        print(f"{mu.name:34s} {verdict:26s} {by}")
    print(f"\n{caught} of {len(rows)} mutations caught"
          + (f"; SURVIVED: {', '.join(r[0].name for r in rows if not r[1].startswith('CAUGHT'))}"
             if caught < len(rows) else ""))
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
