"""The one place that knows whether we run on CUDA or on the CPU.

megatron-core 0.16.x assumes CUDA throughout: it allocates with ``device=torch.cuda.current_device()``,
calls ``Tensor.cuda()``, creates streams/events, and keeps model-parallel RNG states in the CUDA
generator. None of that is essential to the math, so when CUDA is absent :func:`setup` maps those
requests onto the CPU (and gloo), which lets the same megatron-core code run TP/PP/DP on a laptop
or a 2-core CI box. When CUDA exists, nothing is patched. Everything else in the package asks this
module (``device()``, ``backend()``, ``layer_spec_kind()``) instead of touching ``torch.cuda``.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import functools
import importlib.util
import os

import torch

_CPU_MAPPING_ACTIVE = False


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGATRON_KD_FORCE_CPU", "0") != "1"


def backend() -> str:
    """torch.distributed backend: NCCL with CUDA, gloo on the CPU."""
    return "nccl" if cuda_available() else "gloo"


def device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_device(local_rank: int) -> None:
    if cuda_available():
        torch.cuda.set_device(local_rank)


def batch_p2p_comm() -> bool:
    """Whether pipeline send/recv may go through ``batch_isend_irecv`` (megatron's default).

    Not under gloo: gloo matches point-to-point messages between two ranks by posting order
    (one tag), and megatron's batched op list posts [send_prev, recv_prev, send_next, recv_next].
    With PP=2 prev == next, so in the interleaved (virtual-stage) schedule's combined
    forward+backward exchange rank 0's first send (a gradient) lands in rank 1's first receive
    (an activation) of the same shape: silently swapped tensors. megatron's unbatched path
    orders sends/receives by even/odd rank and uses separate groups per direction.
    """
    return backend() != "gloo"


def initialize_weights_on_cpu() -> bool:
    """megatron's use_cpu_initialization: on the CPU each weight is drawn whole and sliced (the
    same full weights at every TP size); on the GPU megatron initialises each shard in place."""
    return not cuda_available()


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def layer_spec_kind() -> str:
    """'te' when running on CUDA with transformer-engine importable, else megatron-core's 'local'."""
    if cuda_available() and transformer_engine_available():
        return "te"
    return "local"


def require_transformer_engine(what: str):
    """Lazy import with a clear message (TE is an optional GPU extra)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"{what} needs transformer-engine, which is not installed; "
            "install the GPU extra: pip install 'megatron_kd[gpu]'"
        ) from None
    return transformer_engine


def synchronize() -> None:
    """Device barrier for honest timings (a CPU-GPU sync point on CUDA)."""
    if cuda_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Start a fresh peak-memory measurement (device memory; a no-op on the CPU)."""
    if cuda_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory allocated since :func:`reset_peak_memory` (0 on the CPU, where the
    allocator gives no comparable number)."""
    return int(torch.cuda.max_memory_allocated()) if cuda_available() else 0


def device_count() -> int:
    return torch.cuda.device_count() if cuda_available() else 0


def device_name() -> str:
    return torch.cuda.get_device_name() if cuda_available() else "cpu"


def rng_states() -> dict:
    """All RNG states this process needs to resume bit-for-bit."""
    import random

    import numpy as np

    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if cuda_available():
        states["cuda"] = torch.cuda.get_rng_state()
    # megatron's model-parallel RNG tracker keeps its own generator states (attention dropout in
    # the TP region forks into 'model-parallel-rng'); Megatron-LM checkpoints them too.
    tracker = _rng_tracker()
    if tracker is not None:
        states["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return states


def _rng_tracker():
    try:
        from megatron.core import tensor_parallel
    except ImportError:
        return None
    tracker = tensor_parallel.get_cuda_rng_tracker()
    return tracker if getattr(tracker, "is_initialized", lambda: True)() else None


def set_rng_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if cuda_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    tracker = _rng_tracker()
    if tracker is not None and "tracker" in states:
        tracker.set_states({k: v.clone() for k, v in states["tracker"].items()})


def cpu_mapping_active() -> bool:
    return _CPU_MAPPING_ACTIVE


def setup() -> None:
    """Call once per process before building megatron-core objects. Idempotent.

    With CUDA: nothing is changed. Without: 'cuda' device requests land on the CPU.
    """
    global _CPU_MAPPING_ACTIVE
    _patch_moe_router_without_te()
    _patch_checkpoint_results_queue()
    if not cuda_available():
        keep_freed_memory()
    if cuda_available() or _CPU_MAPPING_ACTIVE:
        return
    _install_cpu_mapping()
    _CPU_MAPPING_ACTIVE = True


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """CPU runs: glibc keeps freed memory in the process instead of returning it to the OS.

    By default glibc serves every block above its mmap threshold (32 MiB at most) with a fresh
    mapping and trims the heap top once enough is free, so each whole-tensor temporary of a step
    (logits, their softmaxes, gradients) is mapped and page-faulted anew every step: on the
    2-core box that was what kept a KD step at 1.13-1.14x (CE step + teacher forward) while its
    loss's own work was far below that (benchmarks/kd_step.py; 1.03-1.05x with this). What a
    caching allocator does on a GPU. The price: the process's RSS stays at its peak. Not glibc
    (macOS, musl): nothing to do. ``MEGATRON_KD_CPU_KEEP_MEMORY=0`` turns it off. Returns whether
    it is on."""
    if os.environ.get("MEGATRON_KD_CPU_KEEP_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _patch_checkpoint_results_queue() -> None:
    """megatron-core 0.16.1's ``filesystem_async`` returns every save's write results through a
    ``multiprocessing`` *spawn* Manager queue, created at a process's first save even when the save
    is synchronous (ours always are: training/checkpointing.py), where the queue is written and
    read by this process only. The Manager is a fresh interpreter re-importing the main module
    (~5 s per training process on a 2-core box) plus a resource tracker, two helpers that outlived a
    lost rank (docs/reliability.md). A thread queue does the same job in-process. An asynchronous
    save would need the cross-process queue: ``async_save`` is not used anywhere here."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1 ``moe_utils.RouterGatingLinearFunction`` tests
    ``te_general_gemm is not None``, but the name is only bound when Transformer Engine imports,
    so every MoE router forward raises NameError without TE (CPU, or a GPU box without TE).
    Binding it to None selects the torch matmul path the code already has."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------- CPU mapping


def is_cuda_device(dev) -> bool:
    """Whether a device (torch.device, 'cuda:N' string or an int ordinal) names a CUDA device."""
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # megatron passes torch.cuda.current_device(), which we make return 0 on CPU (an int
    # ordinal means "cuda:N" to torch).
    return isinstance(dev, int) and not isinstance(dev, bool)


def _map_device(dev):
    return torch.device("cpu") if is_cuda_device(dev) else dev


def _wrap_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        # megatron's CP RoPE slicing asks for pinned host memory, which needs an accelerator
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU ops are already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "rand", "randn", "randint", "randperm",
    "empty_strided", "as_tensor", "linspace", "eye", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like",
)


def _install_cpu_mapping() -> None:
    cuda = torch.cuda
    # torch's device context manager (``with torch.device("meta"):``) recognises factories by
    # identity, from a set it builds (and caches) on first use. Build it now, from the original
    # functions: built after the patch below it would hold the wrappers, and the originals the
    # wrappers call would no longer get the context's device (transformers' from_pretrained
    # then materialised real, later discarded, RoPE buffers and kept uninitialised ones).
    from torch.utils import _device

    _device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))

    def _tensor_cuda(self, device=None, non_blocking=False, **kwargs):
        return self

    torch.Tensor.cuda = _tensor_cuda
    _orig_to = torch.Tensor.to

    @functools.wraps(_orig_to)
    def _tensor_to(self, *args, **kwargs):
        if args and is_cuda_device(args[0]) and not isinstance(args[0], int):
            args = (torch.device("cpu"),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _map_device(kwargs["device"])
        return _orig_to(self, *args, **kwargs)

    torch.Tensor.to = _tensor_to
    _orig_module_cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, device=None: self  # noqa: E731
    del _orig_module_cuda

    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # Model-parallel RNG tracker: megatron swaps "CUDA" generator states around TP regions
    # (dropout, init). On the CPU those ops draw from the CPU generator, so the tracker must
    # swap that one for its semantics (distinct TP-rank streams, restored afterwards) to hold.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None  # torch.manual_seed calls it; CPU already seeded
    _patch_megatron_rng()
    _patch_megatron_misc()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mpu_random

    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mpu_random._get_cuda_rng_state = _get_cuda_rng_state
    mpu_random._set_cuda_rng_state = _set_cuda_rng_state
    # fork() warns when the CPU state moves inside a "GPU" region; here that is the point.
    logging.getLogger(mpu_random.__name__).addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())


def _patch_megatron_misc() -> None:
    """Grad clipping asserts CUDA grad types; give it a CPU path with the same math."""
    from megatron.core.optimizer import clip_grads

    clip_grads_module = clip_grads
    _orig = clip_grads_module.get_grad_norm_fp32

    @functools.wraps(_orig)
    def get_grad_norm_fp32(grads_for_norm, norm_type=2, grad_stats_parallel_group=None):
        if isinstance(grads_for_norm, torch.Tensor):
            grads_for_norm = [grads_for_norm]
        norm_type = float(norm_type)
        if norm_type == float("inf"):
            total = max((g.abs().max().item() for g in grads_for_norm), default=0.0)
            t = torch.tensor([float(total)], dtype=torch.float)
            if grad_stats_parallel_group is not None:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                             group=grad_stats_parallel_group)
            return t[0].item()
        total = torch.zeros(1, dtype=torch.float)
        for g in grads_for_norm:
            total += torch.norm(g.float(), norm_type) ** norm_type
        if grad_stats_parallel_group is not None:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM,
                                         group=grad_stats_parallel_group)
        return total.item() ** (1.0 / norm_type)

    _orig_clip = clip_grads_module.clip_grad_by_total_norm_fp32

    @functools.wraps(_orig_clip)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for p in parameters:
                g = getattr(p, attr)
                if g is not None:
                    g.mul_(clip_coeff)

    clip_grads_module.get_grad_norm_fp32 = get_grad_norm_fp32
    clip_grads_module.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    # optimizer.py imported the names directly.
    from megatron.core.optimizer import optimizer as optimizer_module

    for name, fn in (("get_grad_norm_fp32", get_grad_norm_fp32),
                     ("clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)):
        if hasattr(optimizer_module, name):
            setattr(optimizer_module, name, fn)

    _patch_optimizer_type_checks()
    _patch_checkpoint_without_output()


def _patch_checkpoint_without_output() -> None:
    """megatron-core 0.16.1's ``CheckpointWithoutOutput.__init__`` sets ``self.fp8 = fp8 is not
    None``, True for the default ``fp8=False``, and then calls TE's FP8GlobalStateManager: selective
    recompute of 'layernorm' (or 'mlp' norms) raises NameError without transformer-engine."""
    if transformer_engine_available():
        return
    from megatron.core.tensor_parallel import random as mpu_random

    cls = mpu_random.CheckpointWithoutOutput
    orig_init = cls.__init__

    @functools.wraps(orig_init)
    def __init__(self, fp8=False):
        orig_init(self, fp8)
        self.fp8 = bool(fp8)

    cls.__init__ = __init__


@contextlib.contextmanager
def _cuda_type_names():
    """``Tensor.type()`` (no arguments) reports CPU tensors as ``torch.cuda.*Tensor`` inside."""
    orig = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return orig(self).replace("torch.", "torch.cuda.", 1)
        return orig(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _patch_optimizer_type_checks() -> None:
    """The distributed optimizer (and the fp16/bf16 one) sort parameters by
    ``param.type() == 'torch.cuda.FloatTensor'`` etc. and reject anything else; on the CPU their
    constructors run with CPU tensors reporting the CUDA type names (same dtype classes). Also
    the distributed optimizer's checkpoint load with torch Adam (see below)."""
    from megatron.core.optimizer import distrib_optimizer, optimizer as optimizer_module

    for cls in (distrib_optimizer.DistributedOptimizer,
                optimizer_module.Float16OptimizerWithFloat16Params):
        orig_init = cls.__init__

        def __init__(self, *args, __orig=orig_init, **kwargs):
            with _cuda_type_names():
                __orig(self, *args, **kwargs)

        cls.__init__ = functools.wraps(orig_init)(__init__)

    # Without Apex/TE the distributed optimizer wraps torch.optim.Adam, whose per-parameter state
    # holds 'step' besides exp_avg/exp_avg_sq. Two megatron-core 0.16 bugs on that path when a
    # checkpoint is loaded: (1) DistributedOptimizer.load_state_dict gives every parameter the
    # SAME step tensor, which torch Adam then increments once per parameter per step (wrong bias
    # correction after a resume); (2) the param-state loaders skip 'step' (it comes from
    # param_groups) but _set_main_param_and_optimizer_states copies every key of the destination
    # state -> KeyError 'step'. Both are fixed here, per parameter, right after (1) happened.
    DistOpt = distrib_optimizer.DistributedOptimizer
    orig_set = DistOpt._set_main_param_and_optimizer_states

    @functools.wraps(orig_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                state["step"] = state["step"].detach().clone()  # own tensor per parameter
                tensors = {**tensors, "step": state["step"]}
        return orig_set(self, model_param, tensors)

    DistOpt._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
