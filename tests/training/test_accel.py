"""The GPU throughput choices (util.accel), checked by the decision each makes for cuda and cpu."""
import torch

from util.accel import adamw_kwargs, configure_cuda_math, ddp_kwargs, maybe_compile


def test_fused_adamw_only_on_cuda():
    assert adamw_kwargs("cuda") == {"fused": True} and adamw_kwargs(torch.device("cuda", 3)) == {"fused": True}
    assert adamw_kwargs("cpu") == {}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **adamw_kwargs("cpu"))
    assert not opt.defaults.get("fused")


def test_tf32_only_on_cuda():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert configure_cuda_math("cpu") == {}
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert configure_cuda_math("cuda:0") == {"matmul.allow_tf32": True, "cudnn.allow_tf32": True}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_ddp_buckets_hold_the_gradients():
    assert ddp_kwargs("cuda:1") == {"device_ids": [1], "gradient_as_bucket_view": True}
    assert ddp_kwargs("cpu") == {"device_ids": None, "gradient_as_bucket_view": True}


def test_compile_in_place_keeps_state_dict_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    keys = list(model.state_dict())
    assert maybe_compile(model, False) is model
    maybe_compile(model, True, backend="eager")
    assert list(model.state_dict()) == keys
    x = torch.ones(1, 3)
    assert torch.equal(model(x), model[0](x))
