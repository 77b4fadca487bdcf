"""Compile every variant of attnfuse's flash kernels (``--module sparse``: the block-sparse
ones, which share flash's tile steps) for a CUDA target, with no GPU needed.

For each kernel variant (dtype, head dim, mask kind, causal, soft-cap, GQA, mask gradient, and
window / dropout when the kernel file supports them) and each autotuning config, the Triton
kernel is compiled ahead of time for the requested architecture (``GPUTarget("cuda", arch, 32)``)
down to a cubin with Triton's bundled ptxas. No driver is involved, so an sm_90 (H100) build can
be checked on any Linux machine. Per variant it reports ok / failed (first error line),
registers per thread, shared memory, and ptxas' spill bytes, and flags configs whose shared
memory exceeds the target's per-block limit (the autotuner would drop those at run time).

How the kernel arguments are obtained: by default the public host functions
``flash_forward`` / ``flash_backward`` are called on small CPU tensors with every Triton kernel of
``attnfuse/kernels/flash.py`` temporarily replaced by a recorder (input checks skipped, the
Hopper/TMA probe answered for the target), so each kernel is compiled with exactly the arguments
the host passes: new flags or arguments in the kernel file are picked up without changes here.
Arguments are specialised the way Triton's launcher does it (pointers and 16-divisible integers
marked divisible by 16, integers equal to 1 folded into constants), and each launch's configs go
through the autotuner's own early pruning, as at run time (``--all-configs`` keeps them all).
``--from-params`` instead derives each signature from the kernel's parameter list alone, with
plausible values by parameter name (a fallback, also used when the host call cannot be recorded).

Usage:
    python benchmarks/compile_targets.py --arch 90 --quick     # bf16, d=128: ~120 compiles
    python benchmarks/compile_targets.py --arch 80             # every variant (thousands of
    python benchmarks/compile_targets.py --arch 90 --jobs 16   #   compiles: use many cores)
    python benchmarks/compile_targets.py --arch 90 --dtypes fp16 --d 64,256 --kernels _fwd_kernel
    python benchmarks/compile_targets.py --arch 90 --quick --json out.json
    python benchmarks/compile_targets.py --arch 90 --module sparse --quick  # block-sparse kernels
    python benchmarks/compile_targets.py --arch 90 --module sparse_predict  # their prediction
Prints a progress line per compile, then a markdown table. Exit status 1 when any variant fails
to compile. Compiles that spill heavily (fp32, d=256) take one to two minutes each.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Optional

# The interpreter would replace the kernels by CPU emulations: compile the real ones.
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODULES = {"flash": "attnfuse.kernels.flash", "sparse": "attnfuse.kernels.sparse",
           "sparse_predict": "attnfuse.kernels.sparse_predict"}
KERNELS = ("_fwd_kernel", "_bwd_preprocess", "_bwd_row_stats", "_bwd_dkdv_kernel",
           "_bwd_dq_kernel", "_sparse_fwd_kernel", "_sparse_row_stats", "_sparse_dkdv_kernel",
           "_sparse_dq_kernel", "_pool_kernel", "_score_kernel", "_select_kernel")
_OWN_KERNELS = {"flash": KERNELS[:5], "sparse": KERNELS[5:9], "sparse_predict": KERNELS[9:]}
# Maximum dynamic shared memory per block (bytes) by compute capability.
MAX_SMEM = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376,
            90: 232448, 100: 232448, 103: 232448, 120: 101376}


# ----------------------------------------------------------------------------- triton helpers

def _target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


def _backend(arch: int):
    from triton.compiler.compiler import make_backend
    return make_backend(_target(arch))


def _unwrap(obj: Any) -> tuple[Any, list, Any, dict]:
    """(JITFunction, autotune configs, autotuner or None, heuristics) behind a launchable object."""
    from triton.runtime.jit import JITFunction
    configs, tuner, heuristics = [], None, {}
    seen = 0
    while not isinstance(obj, JITFunction) and seen < 8:
        seen += 1
        if hasattr(obj, "configs") and tuner is None:
            tuner, configs = obj, list(obj.configs)
        if hasattr(obj, "values") and isinstance(getattr(obj, "values"), dict):
            heuristics.update(obj.values)
        if not hasattr(obj, "fn"):
            break
        obj = obj.fn
    return obj, configs, tuner, heuristics


def _type_name(dtype) -> str:
    """Triton's name for a torch dtype."""
    import torch
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16",
             torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
    for attr in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = "fp8e4nv" if "e4m3" in attr else "fp8e5"
    return names[dtype]


def _specialize_fallback(value: Any, specialize: bool) -> tuple[str, Any]:
    """Triton's launch-time specialisation, for versions without the native helper."""
    import torch
    if isinstance(value, torch.Tensor):
        return "*" + _type_name(value.dtype), "D" if value.data_ptr() % 16 == 0 else ""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else ("u64" if value >= 2 ** 63 else "i64")
        return kind, "D" if specialize and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"cannot specialise an argument of type {type(value).__name__}")


def _specializer(arch: int):
    """``f(value, param) -> (type, attr desc)``: Triton's own launcher logic where available."""
    backend = _backend(arch)
    native = None
    for where in ("triton._C.libtriton", "triton.runtime.jit"):
        try:
            native = getattr(importlib.import_module(where), "native_specialize_impl")
            break
        except (ImportError, AttributeError):
            continue

    def spec(value: Any, param: Any) -> tuple[str, Any]:
        specialize = not getattr(param, "do_not_specialize", False)
        align = not getattr(param, "do_not_specialize_on_alignment", False)
        if native is not None:
            try:
                out = native(type(backend), value, bool(getattr(param, "is_const", False)),
                             specialize, align)
                return out[0], out[1]
            except Exception:
                pass
        return _specialize_fallback(value, specialize)
    return spec, backend


def _parse_attr(backend: Any, desc: Any) -> list:
    if not isinstance(desc, str) or not desc:
        return []
    try:
        return backend.parse_attr(desc)
    except Exception:
        return [["tt.divisibility", 16]] if "D" in desc else []


# ----------------------------------------------------------------------------- variants

def _variants(quick: bool, dtypes: Optional[list[str]], dims: Optional[list[int]],
              features: dict) -> list[dict]:
    """Host-level variants: what flash_forward / flash_backward are called with."""
    all_dtypes = dtypes or (["bf16"] if quick else ["bf16", "fp16", "fp32"])
    all_dims = dims or ([128] if quick else [64, 128, 256])
    masks = ["none", "bool"] if quick else ["none", "bool", "additive"]
    causals = ["none", "top_left"]
    caps = [0.0] if quick else [0.0, 50.0]
    out = []
    for dt, d, mask, causal, cap in itertools.product(all_dtypes, all_dims, masks, causals, caps):
        out.append(dict(dtype=dt, d=d, mask=mask, causal=causal, softcap=cap))
        if mask == "additive":
            out.append(dict(dtype=dt, d=d, mask=mask, causal=causal, softcap=cap, mask_grad=True))
    # Feature variants on the plain kernel (no mask, no cap): GQA, windows, dropout.
    for dt, d, causal in itertools.product(all_dtypes, all_dims, causals):
        out.append(dict(dtype=dt, d=d, mask="none", causal=causal, softcap=0.0, gqa=True))
        if features.get("window"):
            out.append(dict(dtype=dt, d=d, mask="none", causal=causal, softcap=0.0,
                            window=(255, 0) if causal != "none" else (255, 255)))
        if features.get("dropout_p"):
            out.append(dict(dtype=dt, d=d, mask="none", causal=causal, softcap=0.0, dropout=0.1))
    return out


def _label(v: dict) -> str:
    parts = [v["dtype"], f"d{v['d']}", v["mask"], v["causal"]]
    if v.get("softcap"):
        parts.append(f"cap{v['softcap']:g}")
    if v.get("mask_grad"):
        parts.append("dmask")
    if v.get("gqa"):
        parts.append("gqa4")
    if v.get("window"):
        parts.append("win{}_{}".format(*v["window"]))
    if v.get("dropout"):
        parts.append(f"drop{v['dropout']:g}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- recording

class _Recorder:
    """Stands in for a kernel object: ``rec[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, original: Any, log: list):
        self.name, self.original, self.log = name, original, log
        for attr in ("configs", "fn", "arg_names", "keys"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, args, kwargs))
        return launch

    def run(self, *args, grid=None, warmup=False, **kwargs):
        self.log.append((self.name, args, kwargs))


@contextlib.contextmanager
def _recording(module: Any, arch: int):
    """Replace every Triton kernel object of the module by a recorder; skip the input checks
    (CPU tensors); make capability queries answer the target's."""
    import torch
    from triton.runtime.jit import JITFunction
    log: list = []
    saved = {}
    for name, obj in list(vars(module).items()):
        if isinstance(obj, JITFunction) or hasattr(obj, "configs") or \
                type(obj).__name__ in ("Autotuner", "Heuristics"):
            saved[name] = obj
            setattr(module, name, _Recorder(name, obj, log))
    # Input checks would refuse CPU tensors; the TMA probe would say "no" without a GPU.
    for name, repl in (("_check", lambda *a, **k: None), ("supports", lambda *a, **k: []),
                       ("_has_tma", lambda *a, **k: arch >= 90)):
        if hasattr(module, name):
            saved[name] = getattr(module, name)
            setattr(module, name, repl)
    cap = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *a, **k: (arch // 10, arch % 10)
    try:
        yield log
    finally:
        torch.cuda.get_device_capability = cap
        for name, obj in saved.items():
            setattr(module, name, obj)


def _host_inputs(v: dict):
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[v["dtype"]]
    b, hq, n, d = 2, 4, 1024, v["d"]
    hkv = 1 if v.get("gqa") else hq
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, n, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    vv = torch.randn(b, hkv, n, d, generator=g).to(dtype)
    mask = None
    if v["mask"] == "bool":
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    elif v["mask"] == "additive":
        mask = torch.zeros(1, hq, n, n, dtype=dtype)
    return q, k, vv, mask


def record_launches(module: Any, v: dict, arch: int) -> list[tuple[str, tuple, dict]]:
    """The kernel launches the module's host functions make for variant ``v``: flash's or the
    sparse kernels' forward + backward, or the prediction's (plain, then gated in place)."""
    import torch
    q, k, vv, mask = _host_inputs(v)
    sparse = hasattr(module, "sparse_forward")
    if hasattr(module, "predict"):  # the block-mask prediction: plain, then gated in place
        with _recording(module, arch) as log:
            layout = module.predict(q, k, 0.9, block=128, causal=v["causal"])
            module.predict(q, k, 0.9, block=128, causal=v["causal"], out=layout,
                           go=torch.ones(1, dtype=torch.int32))
        return log
    fwd_params = inspect.signature(module.sparse_forward if sparse
                                   else module.flash_forward).parameters
    bwd_params = inspect.signature(module.sparse_backward if sparse
                                   else module.flash_backward).parameters
    extra_f, extra_b = {}, {}
    if v.get("softcap"):
        extra_f["softcap"] = extra_b["softcap"] = v["softcap"]
    if v.get("window"):
        extra_f["window"] = extra_b["window"] = tuple(v["window"])
    if v.get("dropout"):
        extra_f["dropout_p"] = extra_b["dropout_p"] = v["dropout"]
        seed = torch.zeros(1, dtype=torch.int64)
        if "seed" in fwd_params:
            extra_f["seed"] = seed
        if "seed" in bwd_params:
            extra_b["seed"] = seed
    with _recording(module, arch) as log:
        out = torch.zeros(q.shape[:3] + (vv.shape[-1],), dtype=q.dtype)
        lse = torch.zeros(q.shape[:3], dtype=torch.float32)
        if sparse:
            # A random block mask of 128-token blocks; the kernels' variants do not depend on it.
            from attnfuse.kernels.sparse_layout import layout_from_blocks
            n = q.shape[2]
            blocks = torch.rand(1, 1, -(-n // 128), -(-n // 128),
                                generator=torch.Generator().manual_seed(0)) < 0.5
            window = tuple(v.get("window") or (-1, -1))
            layout = layout_from_blocks(blocks, n, n, block=128, causal=v["causal"],
                                        window=window)
            module.sparse_forward(q, k, vv, layout, mask, None, v["causal"], window=window)
            module.sparse_backward(torch.randn_like(out), q, k, vv, layout, mask, out, lse, None,
                                   v["causal"], window=window,
                                   mask_grad=bool(v.get("mask_grad")))
            return log
        module.flash_forward(q, k, vv, mask, None, v["causal"], **extra_f)
        module.flash_backward(torch.randn_like(out), q, k, vv, mask, out, lse, None, v["causal"],
                              mask_grad=bool(v.get("mask_grad")), **extra_b)
    return log


def _bind(fn: Any, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Launch arguments by parameter name, and the leftover keywords (compile options)."""
    names = list(fn.arg_names)
    named = dict(zip(names, args))
    opts = {}
    for key, val in kwargs.items():
        (named if key in names else opts)[key] = val
    return named, opts


def _constexpr_value(val: Any) -> Any:
    return getattr(val, "value", val) if type(val).__name__ == "constexpr" else val


def jobs_from_launch(name: str, args: tuple, kwargs: dict, module: Any, spec, backend,
                     arch: int, label: str, prune_configs: bool = True) -> list[dict]:
    """One compile job per autotuning config of a recorded launch (after the autotuner's own
    early pruning, as at run time, unless ``prune_configs`` is False)."""
    fn, configs, tuner, heuristics = _unwrap(getattr(module, name))
    base, opts = _bind(fn, args, kwargs)
    configs = configs or [None]
    prune = getattr(tuner, "early_config_prune", None) if tuner is not None else None
    if prune is not None and prune_configs and configs[0] is not None:
        try:
            configs = list(prune(configs, dict(base), **opts)) or configs
        except Exception:
            pass
    jobs = []
    for cfg in configs:
        named = dict(base)
        options = {k: v for k, v in opts.items() if k in ("num_warps", "num_stages", "num_ctas",
                                                          "maxnreg")}
        if cfg is not None:
            named.update(cfg.kwargs)
            for key in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
                if getattr(cfg, key, None) is not None:
                    options[key] = getattr(cfg, key)
            hook = getattr(cfg, "pre_hook", None)
            if hook is not None:
                try:
                    hook(named)
                except Exception:
                    pass
        for key, h in heuristics.items():
            try:
                named[key] = h(named)
            except Exception:
                pass
        jobs.append(dict(_job(fn, named, options, spec, backend, arch, label),
                         config=dict(cfg.kwargs) if cfg is not None else {}))
    return jobs


def _job(fn: Any, named: dict, options: dict, spec, backend, arch: int, label: str) -> dict:
    """Signature / constexprs / attrs for ``ASTSource``, from argument values by name."""
    signature, constexprs, attrs, unknown = {}, {}, {}, []
    for i, p in enumerate(fn.params):
        if p.name in named:
            val = named[p.name]
        elif getattr(p, "has_default", False):
            val = p.default
        else:
            val = 0
            unknown.append(p.name)
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _constexpr_value(val)
            continue
        ty, desc = spec(val, p)
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = desc
        else:
            parsed = _parse_attr(backend, desc)
            if parsed:
                attrs[p.name] = parsed
    return dict(kernel=fn.__name__, module=fn.__module__, label=label, arch=arch,
                signature=signature, constexprs=constexprs, attrs=attrs, options=options,
                unknown=unknown)


# ----------------------------------------------------------------------------- params fallback

_POINTER_NAMES = {"Q", "K", "V", "Mask", "Out", "Lse", "DO", "Delta", "DK", "DV_", "DQ", "DS",
                  "Bias", "O", "L", "M"}
_FP32_POINTERS = {"Lse", "Delta", "DS", "L", "M"}
_INT_NAMES = {"GROUP", "NQ", "NK", "D", "DV", "HQ", "HKV", "NQ_BUCKET", "NK_BUCKET", "B", "H"}


def _param_value(name: str, v: dict, dtype, n: int):
    """A plausible argument for a parameter known only by name (the ``--from-params`` mode)."""
    import torch
    if name in _POINTER_NAMES or (name not in _INT_NAMES and name[:1].isupper()
                                  and any(c.islower() for c in name)):
        if name in _FP32_POINTERS:
            return torch.empty(16, dtype=torch.float32)
        if name == "Mask" and v["mask"] == "bool":
            return torch.empty(16, dtype=torch.uint8)
        return torch.empty(16, dtype=dtype)
    low = name.lower()
    if any(w in low for w in ("scale", "fill", "softcap", "drop", "p_")):
        return 0.5
    if name in ("NQ", "NK"):
        return n
    if name in ("NQ_BUCKET", "NK_BUCKET"):
        return n
    if name in ("D", "DV"):
        return v["d"]
    if name == "GROUP":
        return 4 if v.get("gqa") else 1
    if re.fullmatch(r"s[a-z]{1,4}", name):  # strides: unit along the head dim, else 16-aligned
        return 1 if name.endswith("d") else 1024
    return 0  # offsets, seeds, window bounds


def jobs_from_params(module: Any, v: dict, spec, backend, arch: int, label: str,
                     names: list[str]) -> list[dict]:
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[v["dtype"]]
    known = dict(MASK_KIND={"none": 0, "bool": 1, "additive": 2}[v["mask"]],
                 CAUSAL=v["causal"] != "none", HAS_SOFTCAP=bool(v.get("softcap")),
                 PREC="ieee" if v["dtype"] == "fp32" else "tf32", EMU_BF16=False,
                 BLOCK_D=max(16, 1 << (v["d"] - 1).bit_length()),
                 BLOCK_DV=max(16, 1 << (v["d"] - 1).bit_length()),
                 WRITE_DS=bool(v.get("mask_grad")), BLOCK_M=64,
                 HAS_WINDOW=bool(v.get("window")), WINDOW=bool(v.get("window")),
                 HAS_DROPOUT=bool(v.get("dropout")), DROPOUT=bool(v.get("dropout")))
    jobs = []
    for name in names:
        if not hasattr(module, name):
            continue
        fn, configs, _, _ = _unwrap(getattr(module, name))
        owner = [o for o in vars(module).values() if _unwrap(o)[0] is fn and _unwrap(o)[1]]
        configs = _unwrap(owner[0])[1] if owner else (configs or [None])
        for cfg in configs:
            named = {}
            for p in fn.params:
                if p.is_constexpr:
                    if cfg is not None and p.name in cfg.kwargs:
                        named[p.name] = cfg.kwargs[p.name]
                    elif p.name in known:
                        named[p.name] = known[p.name]
                    elif getattr(p, "has_default", False):
                        named[p.name] = p.default
                    else:
                        named[p.name] = 0
                else:
                    named[p.name] = _param_value(p.name, v, dtype, 1024)
            options = {}
            if cfg is not None:
                for key in ("num_warps", "num_stages", "num_ctas", "maxnreg"):
                    if getattr(cfg, key, None) is not None:
                        options[key] = getattr(cfg, key)
            jobs.append(dict(_job(fn, named, options, spec, backend, arch, label),
                             config=dict(cfg.kwargs) if cfg is not None else {}))
    return jobs


# ----------------------------------------------------------------------------- compiling

def _ast_source(fn: Any, signature: dict, constexprs: dict, attrs: dict):
    """ASTSource in the form this Triton takes (name-keyed signature with "constexpr" entries
    and index-path keys for constants/attrs; older releases: index-keyed, ``constants=``)."""
    from triton.compiler import ASTSource
    names = list(fn.arg_names)
    path = {n: (names.index(n),) for n in names}
    try:
        return ASTSource(fn=fn, signature=dict(signature),
                         constexprs={path[k]: v for k, v in constexprs.items()},
                         attrs={path[k]: v for k, v in attrs.items()})
    except TypeError:
        pass
    # Older form: signature by index without constexprs, constants by index, divisibility set.
    sig = {names.index(k): v for k, v in signature.items() if v != "constexpr"}
    consts = {names.index(k): v for k, v in constexprs.items()}
    try:
        from triton.compiler.compiler import AttrsDescriptor
        desc = AttrsDescriptor(divisible_by_16=tuple(names.index(k) for k in attrs))
    except Exception:
        desc = None
    return ASTSource(fn=fn, signature=sig, constants=consts, attrs=desc)


def _ptxas_info(log: str) -> dict:
    info = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        info["regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        info["spill_stores"], info["spill_loads"] = int(m.group(1)), int(m.group(2))
    return info


def _ptxas_path(arch: int) -> Optional[str]:
    """The ptxas Triton uses for this target (its bundled one unless overridden)."""
    import shutil
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        return None
    tries = [lambda: nv.get_ptxas(arch).path, lambda: nv.get_ptxas().path,
             lambda: __import__("triton").knobs.nvidia.ptxas.path,
             lambda: nv._path_to_binary("ptxas")[0],
             lambda: os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas"),
             lambda: shutil.which("ptxas")]
    for attempt in tries:
        try:
            path = attempt()
        except Exception:
            continue
        if path and os.path.isfile(path):
            return path
    return None


def _rerun_ptxas(ptx: str, arch: int) -> dict:
    """ptxas -v on the kernel's PTX (when the compile log was not captured, e.g. a cache hit)."""
    ptxas = _ptxas_path(arch)
    if ptxas is None:
        return {}
    gpu = f"sm_{arch}{'a' if arch >= 90 else ''}"
    try:
        from triton.backends.nvidia import compiler as nv
        gpu = nv.sm_arch_from_capability(arch)
    except Exception:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return _ptxas_info(run.stderr + run.stdout)


def _first_error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"error|Error|failed|out of|exceed|unsupported|not supported", ln):
            return f"{type(exc).__name__}: {ln}"[:300]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def compile_job(job: dict) -> dict:
    """Compile one job (in a worker process); returns the job's result row."""
    import triton
    res = dict(kernel=job["kernel"], label=job["label"], options=job["options"],
               blocks={k: v for k, v in job["constexprs"].items() if k.startswith("BLOCK")},
               config=job.get("config", {}), unknown=job["unknown"])
    t0 = time.time()
    try:
        module = importlib.import_module(job["module"])
        fn = _unwrap(getattr(module, job["kernel"]))[0]
        src = _ast_source(fn, job["signature"], job["constexprs"], job["attrs"])
        knobs = getattr(triton, "knobs", None)
        nv = getattr(knobs, "nvidia", None) if knobs is not None else None
        captured = io.StringIO()
        old = getattr(nv, "dump_ptxas_log", None) if nv is not None else None
        if nv is not None and hasattr(nv, "dump_ptxas_log"):
            nv.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(captured):
                kernel = triton.compile(src, target=_target(job["arch"]),
                                        options=dict(job["options"]))
        finally:
            if nv is not None and hasattr(nv, "dump_ptxas_log"):
                nv.dump_ptxas_log = old
        md = kernel.metadata
        res["status"] = "ok"
        res["shared"] = int(getattr(md, "shared", 0) or 0)
        info = {}
        for key in ("n_regs", "n_spills"):  # present in some Triton releases
            if getattr(md, key, None) is not None:
                info["regs" if key == "n_regs" else "spill_stores"] = int(getattr(md, key))
        info = {**_ptxas_info(captured.getvalue()), **info}
        if "regs" not in info and "ptx" in kernel.asm:
            info.update(_rerun_ptxas(kernel.asm["ptx"], job["arch"]))
        res.update(info)
        limit = MAX_SMEM.get(job["arch"])
        if limit is not None and res["shared"] > limit:
            res["status"] = "smem"
            res["error"] = f"shared memory {res['shared']} > {limit} bytes on sm_{job['arch']}"
    except BaseException as exc:  # report every failure, keep going
        if isinstance(exc, KeyboardInterrupt):
            raise
        res["status"] = "failed"
        res["error"] = _first_error_line(exc)
        res["trace"] = traceback.format_exc(limit=3)[-2000:]
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _dedupe(jobs: list[dict]) -> list[dict]:
    seen, out = {}, []
    for job in jobs:
        key = json.dumps([job["kernel"], job["signature"], {k: repr(v) for k, v in
                          job["constexprs"].items()}, job["attrs"], job["options"]],
                         sort_keys=True, default=repr)
        if key in seen:
            seen[key]["also"].append(job["label"])
            continue
        job = dict(job, also=[])
        seen[key] = job
        out.append(job)
    return out


def _cfg_text(r: dict) -> str:
    b = r.get("blocks", {})
    o = r.get("options", {})
    bm, bn = b.get("BLOCK_M", "-"), b.get("BLOCK_N", "-")
    text = f"{bm}x{bn} w{o.get('num_warps', '-')} s{o.get('num_stages', '-')}"
    for key, val in sorted(r.get("config", {}).items()):  # other tuned switches, e.g. USE_DESC
        if key not in ("BLOCK_M", "BLOCK_N"):
            text += f" {key}={int(val) if isinstance(val, bool) else val}"
    return text


def summary(rows: list[dict], arch: int) -> str:
    lines = [f"### Kernels compiled for sm_{arch}", "",
             "| kernel | variant | config | status | regs | smem (KB) | spill st/ld (B) | s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spill = (f"{r['spill_stores']}/{r.get('spill_loads', '-')}" if "spill_stores" in r
                 else "-")
        shared = f"{r['shared'] / 1024:.1f}" if "shared" in r else "-"
        note = r.get("error", "")
        if r.get("also"):
            note = (note + "; " if note else "") + f"same code as {len(r['also'])} more"
        lines.append(f"| {r['kernel']} | {r['label']} | {_cfg_text(r)} | {r['status']} | "
                     f"{r.get('regs', '-')} | {shared} | {spill} | {r['seconds']} | {note} |")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "smem", "failed")}
    spilling = sum(1 for r in rows if r.get("spill_stores", 0) or r.get("spill_loads", 0))
    lines += ["", f"{len(rows)} distinct compiles: {counts['ok']} ok, {counts['smem']} over the "
              f"shared-memory limit, {counts['failed']} failed; {spilling} compiles spill registers."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=80, help="compute capability (80, 90, ...)")
    parser.add_argument("--quick", action="store_true", help="bf16, d=128, fewer mask kinds")
    parser.add_argument("--dtypes", default=None, help="comma list of bf16,fp16,fp32")
    parser.add_argument("--d", default=None, help="comma list of head dims")
    parser.add_argument("--module", default="flash", choices=sorted(MODULES),
                        help="the kernel file: flash (default), the block-sparse kernels or "
                             "their block-mask prediction")
    parser.add_argument("--kernels", default=None, help="comma list of kernel names to compile")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--from-params", action="store_true",
                        help="derive signatures from parameter lists instead of host calls")
    parser.add_argument("--all-configs", action="store_true",
                        help="compile every autotuning config, also those the kernel's own "
                             "pruning drops for a variant")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args()

    import triton
    module = importlib.import_module(MODULES[args.module])
    spec, backend = _specializer(args.arch)
    wanted = args.kernels.split(",") if args.kernels else list(_OWN_KERNELS[args.module])
    host = (getattr(module, "flash_forward", None) or getattr(module, "sparse_forward", None)
            or module.predict)
    fwd_params = inspect.signature(host).parameters
    features = {name: name in fwd_params for name in ("window", "dropout_p")}
    variants = _variants(args.quick, args.dtypes.split(",") if args.dtypes else None,
                         [int(x) for x in args.d.split(",")] if args.d else None, features)
    if args.module != "flash":  # no soft-capping there
        variants = [v for v in variants if not v.get("softcap")]
    if args.module == "sparse_predict":  # q and k alone: one variant per dtype, dim and band
        variants = [v for v in variants if v["mask"] == "none" and len(v) == 5]
    print(f"triton {triton.__version__} | target sm_{args.arch} | {len(variants)} host variants "
          f"| kernel features: {', '.join(k for k, v in features.items() if v) or 'base'}",
          flush=True)

    jobs: list[dict] = []
    fallback_reason = None
    for v in variants:
        label = _label(v)
        launches = None
        if not args.from_params:
            try:
                launches = record_launches(module, v, args.arch)
            except Exception as exc:
                fallback_reason = fallback_reason or _first_error_line(exc)
        if launches is None:
            jobs += jobs_from_params(module, v, spec, backend, args.arch, label, wanted)
            continue
        for name, a, kw in launches:
            fn = _unwrap(getattr(module, name))[0]
            if name not in wanted and fn.__name__ not in wanted:
                continue
            jobs += jobs_from_launch(name, a, kw, module, spec, backend, args.arch, label,
                                     not args.all_configs)
    if fallback_reason:
        print(f"note: host calls could not be recorded ({fallback_reason}); signatures derived "
              "from parameter lists", flush=True)
    jobs = _dedupe(jobs)
    unknown = sorted({u for j in jobs for u in j["unknown"]})
    if unknown:
        print(f"note: parameters with no value from the host call, given their default or 0: "
              f"{', '.join(unknown)}", flush=True)
    print(f"{len(jobs)} distinct compiles, {args.jobs} at a time", flush=True)

    rows: list[dict] = []
    t0 = time.time()

    def done(job: dict, res: dict) -> None:
        res["also"] = job["also"]
        rows.append(res)
        extra = (f"regs {res.get('regs', '?')} smem {res.get('shared', '?')} "
                 f"spills {res.get('spill_stores', '?')}/{res.get('spill_loads', '?')}"
                 if res["status"] != "failed" else res.get("error", ""))
        print(f"[{len(rows)}/{len(jobs)} {time.time() - t0:.0f}s] {res['status']:6} "
              f"{res['kernel']} {res['label']} {_cfg_text(res)} | {extra}", flush=True)
        if args.verbose and res["status"] == "failed":
            print(res.get("trace", ""), flush=True)

    if args.jobs <= 1:
        for job in jobs:
            done(job, compile_job(job))
    else:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futures = {ex.submit(compile_job, job): job for job in jobs}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:
                    res = dict(kernel=job["kernel"], label=job["label"], options=job["options"],
                               blocks={}, config=job.get("config", {}), status="failed",
                               error=_first_error_line(exc), seconds=0.0)
                done(job, res)
    order = {k: i for i, k in enumerate(KERNELS)}
    rows.sort(key=lambda r: (order.get(r["kernel"], 99), r["label"], _cfg_text(r)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, rows=rows), f, indent=1,
                      default=repr)
    print()
    print(summary(rows, args.arch))
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
