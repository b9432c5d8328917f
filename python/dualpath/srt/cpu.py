"""CPU support: what SGLang's PD and HiCache paths need on a machine without CUDA.

Registered only when ``torch.cuda.is_available()`` is false, so GPU servers run stock code paths.

- Rotary embedding: without CUDA, SGLang's ``RotaryEmbedding`` imports ``vllm._custom_ops``; a torch
  stand-in (``vllm_standin/``) is put on ``sys.path`` when vLLM is not installed.
- NIXL: SGLang registers KV pools as ``VRAM``; CPU pools are ``DRAM``. NIXL's progress thread, which
  polls without a pause, is off: SGLang's PD loops poll transfers and notifications themselves.
- Paged KV allocation: SGLang allocates pages with Triton kernels; they run in Triton's interpreter
  (``TRITON_INTERPRET=1``, set by the launcher before anything imports Triton).
- Host KV pools (MHA and MLA): no CUDA host registration (pinning); host <-> device copies with torch index
  ops instead of ``sgl_kernel`` (whose CUDA build does not load without a driver). Layout ``layer_first``
  only, layers not sharded across ranks.
- Idle scheduler loop: a scheduler with no batch to run loops straight back, one core per server at 100%.
  On a GPU server that core only launches kernels; on a CPU server it is the core that computes, and the
  spinning loop, holding the GIL, starves the server's own I/O threads (HiCache reads, KV transfers) and
  the other servers of the machine. Each idle turn sleeps ``IDLE_YIELD_S``; a running batch never waits
  for it (the loop reaches ``on_idle`` only when it has nothing to run).
- Host memory reserve: SGLang refuses a HiCache host pool that would leave less than 10 GiB of DRAM free, a
  margin for a GPU server whose DRAM holds little else. On CPU the device pools, the models and every server of
  the machine live in that DRAM as well, so four tiny servers (a 2P2D cluster, about 4 GB each) could not start
  on 24 GB though they fit: the reserve is ``CPU_HOST_RESERVE_BYTES``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from dualpath.srt import surface
from dualpath.srt.config import CPU_ENV

STANDIN = Path(__file__).with_name("vllm_standin")
IDLE_YIELD_S = 0.001
CPU_HOST_RESERVE_BYTES = 1 << 30

_CUDA_COMMUNICATORS = ("use_pynccl", "use_pymscclpp", "use_custom_allreduce", "use_torch_symm_mem_all_reduce")
# nixl_agent method -> positional index of its mem_type argument (self excluded).
_NIXL_MEM_TYPE_ARG = {"register_memory": 1, "get_xfer_descs": 1, "get_reg_descs": 1, "prep_xfer_dlist": 2}


def needed() -> bool:
    return not torch.cuda.is_available()


def export(tp_size: int = 1) -> None:
    """Switch CPU support on for the SGLang processes this one spawns: the stand-ins (``$DUALPATH_CPU_SUPPORT``)
    and what every SGLang process needs on CPU: Triton's interpreter; with tensor parallelism, one entry per rank
    in ``$SGLANG_CPU_OMP_THREADS_BIND`` (SGLang refuses more ranks than NUMA nodes without it) and no
    TorchDynamo (at TP > 1 SGLang compiles its vocabulary-parallel embedding mask, about 50 s of every start on
    CPU; eager gives the same results)."""
    os.environ.update({"TRITON_INTERPRET": "1", CPU_ENV: "1"})
    if tp_size > 1:
        cores = sorted(os.sched_getaffinity(0))
        ranks = "|".join(str(cores[rank % len(cores)]) for rank in range(tp_size))
        os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", ranks)
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def install_rotary_standin() -> None:
    if importlib.util.find_spec("vllm") is None and str(STANDIN) not in sys.path:
        sys.path.append(str(STANDIN))


def reserve_less_host_memory() -> None:
    surface.set_host_memory_reserve(CPU_HOST_RESERVE_BYTES)


def _dram(kind: object) -> object:
    return "DRAM" if kind in ("VRAM", "cuda") else kind


def _nixl_in_dram(position: int) -> Callable[..., Any]:
    def hook(original: Callable[..., Any], self: object, *args: Any, **kwargs: Any) -> Any:
        if "mem_type" in kwargs:
            kwargs["mem_type"] = _dram(kwargs["mem_type"])
        elif len(args) > position:
            args = (*args[:position], _dram(args[position]), *args[position + 1:])
        return original(self, *args, **kwargs)

    return hook


def _no_progress_thread(original: Callable[..., Any], agent: object, name: str, nixl_conf: Any = None,
                        *args: Any, **kwargs: Any) -> None:
    """NIXL's progress thread polls UCX without a pause: one core per agent. SGLang's PD loops drive progress
    themselves (they poll transfer states and notifications), so on CPU the core goes back to compute."""
    from nixl._api import nixl_agent_config

    conf = nixl_conf if nixl_conf is not None else nixl_agent_config()
    conf.enable_pthread = False
    original(agent, name, conf, *args, **kwargs)


def _no_host_register(original: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Pinning registers memory with the CUDA driver; there is none."""


def _indices(index: torch.Tensor) -> torch.Tensor:
    return index.to(device="cpu", dtype=torch.long)


def _check_layout(pool: Any) -> None:
    layout = surface.pool_shape(pool).layout
    if layout != "layer_first":
        raise ValueError(f"DualPath CPU support copies host KV in the layer_first layout only, not {layout!r}")


def load_to_device_per_layer(original: Callable[..., Any], pool: Any, device_pool: Any, host_indices: torch.Tensor,
                             device_indices: torch.Tensor, layer_id: int, io_backend: str) -> None:
    _check_layout(pool)
    src, dst = _indices(host_indices), _indices(device_indices)
    host_layer, device_layer = surface.layer_buffers(pool, layer_id), surface.layer_buffers(device_pool, layer_id)
    for host, device in zip(host_layer, device_layer, strict=True):
        device.index_copy_(0, dst, host.index_select(0, src))


def backup_from_device_all_layer(original: Callable[..., Any], pool: Any, device_pool: Any,
                                 host_indices: torch.Tensor, device_indices: torch.Tensor, io_backend: str) -> None:
    _check_layout(pool)
    src, dst = _indices(device_indices), _indices(host_indices)
    for layer in range(surface.pool_shape(pool).layers):
        host_layer, device_layer = surface.layer_buffers(pool, layer), surface.layer_buffers(device_pool, layer)
        for host, device in zip(host_layer, device_layer, strict=True):
            host.index_copy_(0, dst, device.index_select(0, src))


def _yield_when_idle(original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return original(scheduler, *args, **kwargs)
    finally:
        time.sleep(IDLE_YIELD_S)


def _absorbed_mla_on_torch_native(original: Callable[..., Any], registry: Any, backend_name: str) -> Any:
    """MLA models (DeepSeek) on the torch-native attention backend: always the absorbed MLA form. SGLang's
    default for backends it does not know computes a fresh prefill in the decompressed MHA form, passing K and V
    of ``qk_nope + rope`` dims, but the torch-native backend attends over the KV cache, which holds the latent
    (``kv_lora_rank + rope``); in the absorbed form queries, keys and values are in the latent's space."""
    handler = original(registry, backend_name)
    if backend_name != "torch_native":
        return handler
    absorbed = surface.resolve("attention_forward_method").MLA
    return lambda attention, forward_batch: absorbed


def _no_cuda_communicators(original: Callable[..., Any], coordinator: Any, *args: Any, **kwargs: Any) -> None:
    """A tensor-parallel group's collectives on CPU: SGLang asks for NCCL (and other CUDA communicators) unless the
    device is an NPU or XPU, and PyNccl refuses a CPU device; without them the group's collectives fall back to
    torch.distributed over its gloo group."""
    original(coordinator, *args, **{k: False if k in _CUDA_COMMUNICATORS else v for k, v in kwargs.items()})


def hooks() -> list[tuple[str, str, Callable[..., Any]]]:
    """(target name, method or "", AROUND hook) for every CPU stand-in."""
    return [
        ("host_load_layer", "", load_to_device_per_layer),
        ("host_backup_all", "", backup_from_device_all_layer),
        ("mla_host_load_layer", "", load_to_device_per_layer),
        ("mla_host_backup_all", "", backup_from_device_all_layer),
        ("cuda_host_register", "", _no_host_register),
        ("scheduler_idle", "", _yield_when_idle),
        ("mla_attention_dispatch", "", _absorbed_mla_on_torch_native),
        ("group_coordinator_init", "", _no_cuda_communicators),
        *[("nixl_agent", method, _nixl_in_dram(position)) for method, position in _NIXL_MEM_TYPE_ARG.items()],
        ("nixl_agent", "__init__", _no_progress_thread),
    ]
