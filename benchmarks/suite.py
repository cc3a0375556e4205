"""The benchmark suite (issue 7): pifi_jax vs transformers + PEFT (eager and torch.compile).

    python benchmarks/suite.py                       # every row at full size, on a GPU
    python benchmarks/suite.py --rows=1,4 --steps=30
    python benchmarks/suite.py --smoke --out=/tmp/b.md   # tiny shapes on the CPU: a harness check
    python benchmarks/suite.py --dry-run             # lower the full-size pifi_jax steps only

For each row, both frameworks train the same randomly initialised model at the same shapes on
the same synthetic token batch, with AdamW, clipping at 1.0 and bf16 compute (float32 master
weights for what trains, frozen weights stored in bf16). After `--warmup` untimed steps, the
median of `--steps` device-synchronised steps is reported as step time and tokens/s, with the peak
device memory and the compile time. pifi_jax runs the project's own train step
(`pifi_jax.train.step.make_train_step`, jitted with the state donated as the trainer does; row 5
a causal-LM step of the same shape, below); PyTorch runs `benchmarks/torch_reference.py`.

Rows (benchmarks/README.md says more):
  1  bert-base sequence classification, full fine-tuning, batch 32x128 and 256x128
  2  bert-base LoRA r8 on query, value           (same shapes)
  3  bert-base IA3 on key, value, output.dense   (same shapes)
  4  PiFi: bert-base + one frozen Llama-3.1-8B-shaped layer on the [CLS] token, vs base, 32x128
  5  Llama-3.1-8B-shaped causal LM, LoRA r16 on q,k,v,o,gate,up,down, 8x1024 (stepped down to
     the largest batch both frameworks fit), remat / gradient checkpointing

Also: the bf16 matmul rate of the device, measured in the same run (a chain of large
`jnp.matmul`s), and each pifi_jax row's model FLOPs utilisation against it; the compiled step's
memory analysis, next to the bytes of the trainable parameters + optimizer state and of the
frozen weights (which get neither gradient buffers nor optimizer state); each row's target
(ratios from the issue) and whether it was met.

Isolation: by default (full size) every measurement runs in a fresh child process (this script
with --worker), so peak memory is that measurement's own and the two frameworks never share the
device's memory pools. `--smoke` runs everything in this process (fast enough for a test).

Results are appended to `--out` (default docs/benchmarks.md) as a section headed by the GPU,
driver, library versions and date; the same section is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
# Targets of the issue (ratios, so they hold on any GPU).
TARGET_RATIO_SMALL_BATCH = 2.5  # rows 1-3, smaller batch: tokens/s vs the best PyTorch variant
TARGET_MFU_LARGE_BATCH = 0.50  # rows 1-3, larger batch
TARGET_PIFI_STEP = 1.05  # row 4: PiFi step time / base step time
TARGET_PIFI_MEMORY = 1.10  # row 4: extra peak memory / the plugged layer's weights
TARGET_RATIO_LLAMA = 1.5  # row 5: tokens/s vs the best PyTorch variant, with no more peak memory
# Bytes a frozen parameter would cost if it trained: a float32 gradient and two AdamW moments.
TRAINED_EXTRA_BYTES = 4 + 4 + 4
ATTENTION_CHOICES = ("native", "xla", "cudnn", "auto")
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "Out of memory")


# ---------------------------------------------------------------------------------------------
# pifi_jax side


def optimizer_config():
    """The fields `pifi_jax.train.optim.make_optimizer` reads: AdamW, constant learning rate."""
    return types.SimpleNamespace(
        name="adamw",
        lr=common.LEARNING_RATE,
        schedule="constant",
        warmup_steps=0,
        warmup_ratio=0.0,
        weight_decay=common.WEIGHT_DECAY,
        no_decay=("bias$", "LayerNorm/"),
        clip_norm=common.CLIP_NORM,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
    )


def _fast_options(fast_compile: bool) -> dict | None:
    """XLA options of the smoke: backend optimisation level 0 and no fusion emitters compile tiny
    CPU programs several times faster (and run them slower; never used for a measurement that
    means something)."""
    if not fast_compile:
        return None
    return {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _jax_peft_config(spec: dict):
    from pifi_jax import peft

    spec = dict(spec)
    method = spec.pop("method")
    if method == "lora":
        return peft.LoraConfig(**spec)
    if method == "ia3":
        return peft.IA3Config(**spec)
    raise ValueError(f"no pifi_jax config for PEFT method {method!r}")


def build_jax(case: common.Case, compute, fast_compile: bool = False, abstract: bool = False):
    """(module, params, partition rules, causal) of a case, randomly initialised.

    Mostly-frozen models (PEFT) are initialised straight in the compute dtype, so no float32 copy
    of the frozen weights ever exists on the device; PiFi's plugged layer is created in it too.
    abstract: params are jax.ShapeDtypeStructs (nothing is allocated; see `jax_lower`).
    """
    import jax
    import jax.numpy as jnp

    from pifi_jax import peft
    from pifi_jax.models import registry
    from pifi_jax.pifi import plugin
    from pifi_jax.train import partition

    if case.method in ("full", "lora", "ia3"):
        config = registry.config_from_hf(case.encoder)
        family = registry.family_for(config.model_type)
        param_dtype = jnp.float32 if case.method == "full" else compute
        module = family.build(config, "classification", case.num_labels, compute, param_dtype)
    elif case.method in ("pifi", "base"):
        config = registry.config_from_hf(case.encoder)
        encoder = registry.family_for(config.model_type).build(
            config, "encoder", 0, compute, jnp.float32
        )
        plug = None
        if case.method == "pifi":
            llm = registry.config_from_hf(case.decoder)
            layer = registry.family_for(llm.model_type).decoder_layer(
                llm, llm.num_layers - 1, compute, compute
            )
            plug = plugin.PifiPlugin(layer, config.hidden_size, compute)
        module = plugin.PifiClassifier(encoder, case.num_labels, plug, dtype=compute)
    elif case.method == "causal_lora":
        config = registry.config_from_hf(case.decoder)
        module = registry.family_for(config.model_type).build(
            config, "causal_lm", 0, compute, compute
        )
        if case.remat:
            module = module.clone(remat_policy="full")
    else:
        raise ValueError(f"unknown case method {case.method!r}")

    ids = jnp.zeros((1, min(8, case.length)), jnp.int32)
    key = jax.random.PRNGKey(0)

    def init_of(m):
        return lambda key: m.init(key, ids, deterministic=True)["params"]

    if case.peft is not None:
        # The PEFT model of `pifi_jax.peft.wrap`, its adapter leaves initialised with the rest
        # (LoRA's B = 0, IA3's vectors = 1: as wrap does) in one init, concrete or abstract.
        config = _jax_peft_config(case.peft)
        base_shapes = partition.flatten(jax.eval_shape(init_of(module), key))
        plan = peft.make_plan(config, module.config, base_shapes)
        module = peft.PeftModel(module, plan, config)
    init = jax.jit(init_of(module), compiler_options=_fast_options(fast_compile))
    params = jax.eval_shape(init, key) if abstract else init(key)
    if case.peft is not None:
        rules = peft.trainable_rules(module, params)
    elif case.method in ("pifi", "base"):
        rules = list(plugin.FROZEN_RULES)
    else:
        rules = [(".*", "trainable")]
    return module, params, rules, case.method == "causal_lora"


def _tree_bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def _tree_size(tree, min_ndim: int = 0) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree) if x.ndim >= min_ndim))


def model_flops(case: common.Case, params) -> float:
    """Model FLOPs of one training step: 6 x non-embedding parameters x the tokens they see, plus
    attention (12 x layers x attention width x length, per token: QK^T and AV, forward and
    backward, unmasked). Recomputation (remat) is not counted; nor is the saving of frozen weights
    (no weight gradients): this is the conventional model-FLOPs count, comparable across rows.

    Encoder layers and every decoder-LM parameter see batch x length tokens; the pooler, heads,
    W_in / W_out and PiFi's plugged layer (one pooled token per example) see batch tokens. Input
    embedding tables are lookups (no FLOPs); the LM head counts.
    """
    from pifi_jax.train.partition import flatten

    batch, length = case.batch, case.length
    per_token = per_example = 0
    for path, leaf in flatten(params).items():
        n = int(math.prod(leaf.shape))
        if "/embeddings/" in f"/{path}" or "embed_tokens/" in path:
            continue
        if case.method == "causal_lora" or "/encoder/" in path:
            per_token += n
        else:
            per_example += n
    flops = 6.0 * (per_token * batch * length + per_example * batch)
    if case.method == "causal_lora":
        cfg = case.decoder
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        width = cfg["num_attention_heads"] * head_dim
        flops += 12.0 * cfg["num_hidden_layers"] * width * length * batch * length
    else:
        cfg = case.encoder
        flops += 12.0 * cfg["num_hidden_layers"] * cfg["hidden_size"] * length * batch * length
        if case.method == "pifi":  # one token per example through one layer
            llm = case.decoder
            head_dim = llm.get("head_dim") or llm["hidden_size"] // llm["num_attention_heads"]
            flops += 12.0 * llm["num_attention_heads"] * head_dim * batch
    return flops


def prepare_jax_step(
    case: common.Case,
    *,
    dtype: str,
    total_steps: int,
    fast_compile: bool = False,
    abstract: bool = False,
):
    """Everything a pifi_jax measurement needs: (jitted step, state, batch, rng, info).

    The step is the project's `make_train_step` (row 5: the causal-LM objective), jitted with the
    state donated as `pifi_jax.train` does; the state holds float32 master weights for what trains
    and the frozen weights in the compute dtype. info: parameter counts, byte sizes, model FLOPs.
    abstract: state and batch are jax.ShapeDtypeStructs (for `jax_lower`: nothing allocated).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pifi_jax.train import optim, partition
    from pifi_jax.train.objectives import CausalLM, Classification
    from pifi_jax.train.step import TrainState, make_train_step

    compute = jnp.dtype(dtype)
    module, params, rules, causal = build_jax(case, compute, fast_compile, abstract)
    flops = model_flops(case, params)
    trainable, frozen = partition.split_params(params, rules)
    del params

    def cast(tree, to):
        if abstract:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, to), tree)
        return jax.tree.map(lambda x: x.astype(to), tree)

    # float32 master weights for what trains; frozen weights stored in the compute dtype.
    trainable, frozen = cast(trainable, jnp.float32), cast(frozen, compute)
    optimizer = optim.make_optimizer(optimizer_config(), trainable, total_steps)

    def create(t, f):
        return TrainState.create(t, f, optimizer)

    state = jax.eval_shape(create, trainable, frozen) if abstract else create(trainable, frozen)
    del trainable, frozen

    arrays = common.synthetic_batch(case)
    if causal:
        arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}
        arrays["loss_mask"] = arrays["attention_mask"]  # every real token is a target
        step_fn = make_train_step(CausalLM(module, tokenizer=None), optimizer)
    else:
        arrays["weights"] = np.ones((case.batch,), np.float32)
        step_fn = make_train_step(Classification(module, case.num_labels), optimizer)
    if abstract:
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    else:
        batch = {k: jnp.asarray(v) for k, v in arrays.items()}

    n_trainable, n_frozen = _tree_size(state.params), _tree_size(state.frozen)
    moments = _tree_size(state.opt_state, min_ndim=1)  # AdamW's mu and nu (counts are scalars)
    info = {
        "trainable_params": n_trainable,
        "frozen_params": n_frozen,
        "opt_moments": moments,
        "opt_covers_trainable_only": moments == 2 * n_trainable,
        "model_flops": flops,
        "trainable_bytes": _tree_bytes(state.params),
        "opt_state_bytes": _tree_bytes(state.opt_state),
        "frozen_bytes": _tree_bytes(state.frozen),
        "batch_bytes": _tree_bytes(batch),
    }
    # Donating the state, as pifi_jax.train does (the CPU backend may ignore donation).
    jitted = jax.jit(step_fn, donate_argnums=0, compiler_options=_fast_options(fast_compile))
    return jitted, state, batch, jax.random.PRNGKey(0), info


def jax_lower(case: common.Case, *, dtype: str = "bfloat16") -> dict:
    """Traces and lowers a case's pifi_jax train step on abstract values: checks a full-size
    configuration end to end (shapes, dtypes, partition, optimizer) on any machine, allocating
    nothing. Returns the parameter counts, model FLOPs and the time taken."""
    start = time.perf_counter()
    jitted, state, batch, rng, info = prepare_jax_step(
        case, dtype=dtype, total_steps=1, abstract=True
    )
    jitted.lower(state, batch, rng)
    return {**info, "lower_s": time.perf_counter() - start}


def jax_measure(
    case: common.Case, *, steps: int, warmup: int, dtype: str, fast_compile: bool = False
) -> dict:
    """Builds the case in pifi_jax, compiles and times its train step; a JSON-able dict.

    fast_compile: see `_fast_options` (the CPU smoke only).
    """
    import jax
    import numpy as np

    jitted, state, batch, rng, info = prepare_jax_step(
        case, dtype=dtype, total_steps=warmup + steps, fast_compile=fast_compile
    )

    start = time.perf_counter()
    compiled = jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    memory = {
        name: getattr(analysis, f"{name}_size_in_bytes", None)
        for name in ("argument", "output", "alias", "temp", "generated_code")
    }

    holder = {"state": state}
    del state

    def step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch, rng)
        return holder["state"], holder["metrics"]

    timing = common.time_steps(step, jax.block_until_ready, warmup=warmup, steps=steps)
    loss = float(np.asarray(holder["metrics"]["loss"]))
    if not math.isfinite(loss):
        raise FloatingPointError(f"{case.label} pifi_jax: the loss is {loss}")

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, peak_kind = stats["peak_bytes_in_use"], "peak_bytes_in_use"
    elif None not in (memory["argument"], memory["output"], memory["temp"]):
        # No allocator statistics (the CPU backend): XLA's own account of the step.
        peak = memory["argument"] + memory["output"] + memory["temp"] - (memory["alias"] or 0)
        peak_kind = "xla estimate"
    else:
        peak, peak_kind = None, None
    return {
        "framework": "pifi_jax",
        "device": f"{device.platform} ({device.device_kind})",
        "step_s": timing.median_s,
        "times_s": timing.times,
        "first_s": timing.first_s,
        "compile_s": compile_s,
        "peak_bytes": peak,
        "peak_kind": peak_kind,
        "memory_analysis": memory,
        **info,
        "loss": loss,
    }


def jax_matmul_rate(n: int, dtype: str, repeats: int, chain: int = 10) -> dict:
    """FLOP/s of `chain` dependent [n, n] @ [n, n] matmuls in one jitted call (median of
    `repeats` calls after a warm-up): the device's achievable dense matmul rate in `dtype`."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dt)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / math.sqrt(n)).astype(dt)  # keeps |x| ~ 1

    @jax.jit
    def chained(a, b):
        return jax.lax.fori_loop(0, chain, lambda _, x: jnp.matmul(x, b), a)

    timing = common.time_steps(
        lambda: chained(a, b), jax.block_until_ready, warmup=2, steps=repeats
    )
    device = jax.local_devices()[0]
    return {
        "flops_per_s": 2.0 * n**3 * chain / timing.median_s,
        "n": n,
        "dtype": dtype,
        "chain": chain,
        "repeats": repeats,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }


# ---------------------------------------------------------------------------------------------
# Running measurements: in this process, or each in a fresh child process


def run_measurement(spec: dict) -> dict:
    """One measurement from its JSON spec (what a --worker child runs)."""
    kind = spec.get("kind")
    if kind not in ("matmul", "jax", "torch"):
        raise ValueError(f"unknown measurement kind {kind!r} (matmul, jax or torch)")
    if kind == "matmul":
        return jax_matmul_rate(spec["n"], spec["dtype"], spec["repeats"])
    case = common.Case.from_json(spec["case"])
    kw = dict(steps=spec["steps"], warmup=spec["warmup"], dtype=spec["dtype"])
    if kind == "jax":
        from pifi_jax.layers import attention_implementation

        # Traced (and compiled) inside the block, so the step uses the chosen attention.
        with attention_implementation(spec.get("attention", "native")):
            return jax_measure(case, fast_compile=spec.get("fast_compile", False), **kw)
    from benchmarks import torch_reference  # only a torch measurement imports torch

    return torch_reference.measure(case, spec["variant"], require_cuda=spec["require_cuda"], **kw)


def _describe(spec: dict) -> str:
    if spec.get("kind") == "matmul":
        return f"matmul {spec['n']}x{spec['n']} {spec['dtype']}"
    if "case" not in spec:
        return f"measurement {spec}"
    case = spec["case"]
    framework = "pifi_jax" if spec["kind"] == "jax" else f"torch {spec['variant']}"
    return f"row {case['row']} {case['method']} {case['batch']}x{case['length']} {framework}"


def measure_in_process(spec: dict) -> dict:
    """Runs the measurement here; an exception becomes {"error": ...} (its traceback on stderr)."""
    print(f"[suite] {_describe(spec)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = run_measurement(spec)
        print(f"[suite]   done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return result
    except Exception as err:  # one failing measurement must not lose the others
        traceback.print_exc()
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        import gc

        gc.collect()


def measure_isolated(spec: dict, timeout_s: float) -> dict:
    """Runs the measurement in a fresh `python suite.py --worker` child and reads its result."""
    print(f"[suite] {_describe(spec)} (child process)", file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # The child is alone on the device: let XLA take nearly all of it (the default is 75%).
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        command += ["--worker-out", str(out)]
        try:
            proc = subprocess.run(command, env=env, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout: no result within {timeout_s:.0f} s"}
        if out.is_file():
            return json.loads(out.read_text(encoding="utf-8"))
        return {"error": f"child process exited with status {proc.returncode} and no result"}


def worker_main(spec_json: str, out_path: str) -> int:
    result = measure_in_process(json.loads(spec_json))
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _is_oom(result: dict) -> bool:
    return "error" in result and any(m in result["error"] for m in OOM_MARKERS)


# ---------------------------------------------------------------------------------------------
# Targets and the report


def _ok(result: dict | None) -> bool:
    return bool(result) and "error" not in result


def tokens_per_s(case: common.Case, result: dict) -> float:
    return case.tokens / result["step_s"]


def best_torch(entry: dict) -> tuple[str, dict] | None:
    """(variant, result) of the PyTorch variant with the most tokens/s, or None."""
    done = [(v, r) for v, r in entry["torch"].items() if _ok(r)]
    return min(done, key=lambda vr: vr[1]["step_s"]) if done else None


def mfu(entry: dict, matmul: dict) -> float | None:
    result = entry["jax"]
    if not (_ok(result) and _ok(matmul)):
        return None
    return result["model_flops"] / result["step_s"] / matmul["flops_per_s"]


def speed_ratio(entry: dict) -> float | None:
    best = best_torch(entry)
    if best is None or not _ok(entry["jax"]):
        return None
    return best[1]["step_s"] / entry["jax"]["step_s"]  # same tokens: tokens/s ratio


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def evaluate_targets(entries: list[dict], matmul: dict) -> None:
    """Sets entry["target"] and entry["met"] (text) for every entry."""
    for entry in entries:
        case = entry["case"]
        entry["target"], entry["met"] = "-", "-"
        if case.row in (1, 2, 3):
            if entry["index"] == 0:
                entry["target"] = f"tokens/s ≥ {TARGET_RATIO_SMALL_BATCH}× best PyTorch"
                ratio = speed_ratio(entry)
                entry["met"] = (
                    "n/a"
                    if ratio is None
                    else f"{_yes(ratio >= TARGET_RATIO_SMALL_BATCH)} ({ratio:.2f}×)"
                )
            else:
                entry["target"] = f"MFU ≥ {TARGET_MFU_LARGE_BATCH:.0%}"
                value = mfu(entry, matmul)
                met = value is not None and value >= TARGET_MFU_LARGE_BATCH
                entry["met"] = "n/a" if value is None else f"{_yes(met)} ({value:.1%})"
        elif case.row == 4 and case.method == "pifi":
            entry["target"] = (
                f"step ≤ {TARGET_PIFI_STEP}× base; extra peak memory ≤ "
                f"{TARGET_PIFI_MEMORY:.2f}× the layer's weights"
            )
            base = next(
                (e for e in entries if e["case"].row == 4 and e["case"].method == "base"), None
            )
            entry["met"] = _pifi_met(entry, base)
        elif case.row == 5:
            entry["target"] = (
                f"tokens/s ≥ {TARGET_RATIO_LLAMA}× best PyTorch, peak memory ≤ that PyTorch's"
            )
            entry["met"] = _llama_met(entry)


def _pifi_met(entry: dict, base: dict | None) -> str:
    if base is None or not (_ok(entry["jax"]) and _ok(base["jax"])):
        return "n/a (needs the base case)"
    pifi, ref = entry["jax"], base["jax"]
    step = pifi["step_s"] / ref["step_s"]
    parts = [f"step {_yes(step <= TARGET_PIFI_STEP)} ({step:.3f}×)"]
    layer_bytes = common.llama_layer_params(entry["case"].decoder) * entry["layer_itemsize"]
    same_kind = pifi["peak_kind"] == ref["peak_kind"] and pifi["peak_kind"] is not None
    # Allocator peaks are per measurement only in isolated runs; XLA's estimates always are.
    if same_kind and (entry["peak_isolated"] or pifi["peak_kind"] == "xla estimate"):
        extra = pifi["peak_bytes"] - ref["peak_bytes"]
        ok = extra <= TARGET_PIFI_MEMORY * layer_bytes
        # W_in and W_out train: float32 weights, gradients and two AdamW moments, 16 B each.
        projections = (pifi["trainable_params"] - ref["trainable_params"]) * 16
        parts.append(
            f"memory {_yes(ok)} (+{common.fmt_bytes(extra)}; layer "
            f"{common.fmt_bytes(layer_bytes)}, W_in/W_out with grads and AdamW "
            f"{common.fmt_bytes(projections)})"
        )
    else:
        parts.append("memory n/a (needs per-measurement peaks: run isolated)")
    return "; ".join(parts)


def _llama_met(entry: dict) -> str:
    ratio = speed_ratio(entry)
    if ratio is None:
        return "n/a"
    variant, ref = best_torch(entry)
    parts = [f"speed {_yes(ratio >= TARGET_RATIO_LLAMA)} ({ratio:.2f}× vs torch {variant})"]
    ours = entry["jax"]["peak_bytes"]
    if ours is None or ref["peak_bytes"] is None or not entry["peak_isolated"]:
        parts.append("memory n/a (no device memory statistics)")
    else:
        ok = ours <= ref["peak_bytes"]
        parts.append(
            f"memory {_yes(ok)} ({common.fmt_bytes(ours)} vs {common.fmt_bytes(ref['peak_bytes'])})"
        )
    return "; ".join(parts)


def _peak_cell(result: dict, isolated: bool) -> str:
    if result.get("peak_bytes") is None:
        return "-"
    text = common.fmt_bytes(result["peak_bytes"])
    if result.get("peak_kind") == "xla estimate":
        return text + " (XLA est.)"
    if not isolated and result.get("peak_kind") == "peak_bytes_in_use":
        return text + " (process-wide)"
    return text


def _result_cells(case: common.Case, result: dict, isolated: bool) -> list[str]:
    if not _ok(result):
        error = result.get("error", "not run") if result else "not run"
        error = " ".join(error.split())[:120].replace("|", "\\|")  # one table cell
        return [f"failed: {error}", "-", "-", "-"]
    compile_s = result.get("compile_s")
    return [
        common.fmt_number(1e3 * result["step_s"], 2),
        common.fmt_number(tokens_per_s(case, result), 0),
        _peak_cell(result, isolated),
        "-" if compile_s is None else common.fmt_number(compile_s, 1),
    ]


MAIN_HEADER = (
    "row",
    "case",
    "batch × length",
    "framework",
    "step ms",
    "tokens/s",
    "peak memory",
    "compile s",
    "MFU",
    "pifi_jax / best PyTorch",
    "target",
    "met",
)


def main_table(entries: list[dict], matmul: dict) -> str:
    rows = []
    for entry in entries:
        case, isolated = entry["case"], entry["peak_isolated"]
        shape = f"{case.batch} × {case.length}"
        if entry.get("out_of_memory_at"):
            shape += f" (batch {', '.join(map(str, entry['out_of_memory_at']))}: out of memory)"
        value = mfu(entry, matmul)
        ratio = speed_ratio(entry)
        best = best_torch(entry)
        ratio_cell = "-" if ratio is None else f"{ratio:.2f}× (vs torch {best[0]})"
        rows.append(
            [
                str(case.row),
                case.method,
                shape,
                "pifi_jax",
                *_result_cells(case, entry["jax"], isolated),
                "-" if value is None else f"{value:.1%}",
                ratio_cell,
                entry["target"],
                entry["met"],
            ]
        )
        for variant, result in entry["torch"].items():
            rows.append(
                [
                    str(case.row),
                    case.method,
                    shape,
                    f"torch {variant}",
                    *_result_cells(case, result, isolated),
                    "-",
                    "-",
                    "",
                    "",
                ]
            )
    return common.markdown_table(MAIN_HEADER, rows, "llllrrrrrlll")


MEMORY_HEADER = (
    "row",
    "case",
    "trainable params",
    "frozen params",
    "trainable + AdamW state",
    "frozen weights",
    "grad + AdamW the frozen weights would need",
    "AdamW moments for",
    "XLA argument",
    "XLA output",
    "XLA alias",
    "XLA temp",
)


def memory_table(entries: list[dict]) -> str:
    rows = []
    for entry in entries:
        case, r = entry["case"], entry["jax"]
        if not _ok(r):
            continue
        m = r["memory_analysis"]
        would = r["frozen_params"] * TRAINED_EXTRA_BYTES
        covers = (
            "trainable leaves only" if r["opt_covers_trainable_only"] else "**frozen leaves too**"
        )
        rows.append(
            [
                str(case.row),
                case.label,
                common.fmt_count(r["trainable_params"]),
                common.fmt_count(r["frozen_params"]),
                common.fmt_bytes(r["trainable_bytes"] + r["opt_state_bytes"]),
                common.fmt_bytes(r["frozen_bytes"]),
                common.fmt_bytes(would) if would else "-",
                covers,
                common.fmt_bytes(m["argument"]),
                common.fmt_bytes(m["output"]),
                common.fmt_bytes(m["alias"]),
                common.fmt_bytes(m["temp"]),
            ]
        )
    return common.markdown_table(MEMORY_HEADER, rows, "llrrrrrlrrrr")


SMOKE_NOTE = (
    "> **Smoke run (harness check, not a performance figure).** Tiny shapes on the CPU in float32 "
    "with one or two timed steps: the numbers only show that every row runs end to end in both "
    "frameworks. Targets are evaluated for the same reason and mean nothing here."
)


def render(env: dict, settings: dict, matmul: dict, entries: list[dict]) -> str:
    """The markdown section of one run."""
    mode = "smoke (CPU harness check)" if settings["smoke"] else "full size"
    device = matmul.get("device_kind", "?") if _ok(matmul) else "?"
    lines = [f"## {env['date']}: {device}, {mode}", ""]
    if settings["smoke"]:
        lines += [SMOKE_NOTE, ""]
    lines += common.environment_lines(env)
    if _ok(matmul):
        lines.append(
            f"- JAX device: {matmul['device_kind']} (backend {matmul['backend']}, "
            f"{matmul['device_count']} device(s)); measured {matmul['dtype']} matmul rate "
            f"{matmul['flops_per_s'] / 1e12:.1f} TFLOP/s ({matmul['chain']} chained "
            f"{matmul['n']}×{matmul['n']} jnp.matmul, median of {matmul['repeats']})"
        )
    else:
        lines.append(f"- matmul rate: failed ({matmul.get('error')}); no MFU")
    lines.append(
        f"- settings: compute {settings['dtype']}, AdamW (lr {common.LEARNING_RATE}, weight decay "
        f"{common.WEIGHT_DECAY}, clip {common.CLIP_NORM}), {settings['warmup']} warm-up step(s) "
        f"excluded, median of {settings['steps']} timed step(s), PyTorch variants "
        f"{', '.join(settings['torch_variants']) or 'none'}, pifi_jax attention "
        f"{settings.get('attention', 'native')}, "
        + (
            "each measurement in its own process"
            if settings["isolate"]
            else "all measurements in one process"
        )
    )
    lines += [
        "",
        "Step time is the median device-synchronised training step (forward, backward, clipping, "
        "AdamW update); tokens/s = batch × length / step time; compile s: pifi_jax's trace + XLA "
        "compile of the step, torch.compile's first step minus a median step; peak memory: JAX's "
        "`peak_bytes_in_use`, torch's `max_memory_allocated` (model, optimizer and activations; "
        "'XLA est.' where JAX has no allocator statistics, as on the CPU: the step's argument + "
        "output + temp - alias bytes); "
        "MFU: model FLOPs (6 × non-embedding parameters × tokens + attention) per second over the "
        "measured matmul rate.",
        "",
        main_table(entries, matmul),
        "",
        "Compiled pifi_jax steps (`jax.jit(step).lower(state, batch, rng).compile()"
        ".memory_analysis()`). The frozen weights are step arguments, returned unchanged in "
        "outputs that alias the donated arguments (XLA alias); the optimizer holds moments for "
        "the trainable leaves alone; and no gradient of a frozen weight is materialised: those "
        "would need the bytes in the 'would need' column, while XLA temp (activations, the "
        "trainable gradients, the update's scratch) is what the step allocates besides its "
        "arguments.",
        "",
        memory_table(entries),
        "",
    ]
    return "\n".join(lines)


def append_report(path: Path, section: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nSections appended by `benchmarks/suite.py`.\n", "utf-8")
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + section)


# ---------------------------------------------------------------------------------------------
# The command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pifi_jax vs transformers + PEFT training benchmarks (issue 7).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a check)")
    parser.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows to run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (3; smoke 1)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file appended to")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default=None,
        help="compute dtype (bfloat16; smoke float32)",
    )
    parser.add_argument(
        "--torch-variants",
        default=None,
        help="comma-separated from eager,compile; empty = no PyTorch (eager,compile; smoke eager)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each measurement in a fresh child process (default: yes; smoke no)",
    )
    parser.add_argument(
        "--llama-batches",
        default=None,
        help="row 5 batches, tried in order until both frameworks fit (8,4,2,1; smoke 2)",
    )
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="n of the matmul rate (8192; smoke 128)"
    )
    parser.add_argument(
        "--attention",
        # pifi_jax.layers.ATTENTION_IMPLEMENTATIONS, spelled out: importing pifi_jax here would
        # import jax before run_suite sets XLA's preallocation (tests/test_benchmarks.py checks).
        choices=ATTENTION_CHOICES,
        default="native",
        help="pifi_jax attention (pifi_jax.layers.set_attention_implementation). The rows train "
        "with the models' attention dropout (0.1 in BERT), which fused kernels cannot express, "
        "so there the step keeps the native path",
    )
    parser.add_argument(
        "--child-timeout", type=float, default=3600.0, help="seconds per isolated measurement"
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run full size without a GPU (slow; the PyTorch side then runs on the CPU too)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="only trace and lower each selected pifi_jax step on abstract values (any machine, "
        "no memory used) and print the parameter counts and FLOPs; nothing is appended",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    smoke = args.smoke
    if args.steps is None:
        args.steps = 2 if smoke else 20
    if args.warmup is None:
        args.warmup = 1 if smoke else 3
    if args.dtype is None:
        args.dtype = "float32" if smoke else "bfloat16"
    if args.torch_variants is None:
        args.torch_variants = "eager" if smoke else "eager,compile"
    if args.isolate is None:
        args.isolate = not smoke
    if args.llama_batches is None:
        args.llama_batches = "2" if smoke else "8,4,2,1"
    if args.matmul_size is None:
        args.matmul_size = 128 if smoke else 8192

    def ints(text: str, name: str) -> list[int]:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            parser.error(f"--{name} takes comma-separated integers, got {text!r}")

    args.rows = ints(args.rows, "rows")
    unknown = sorted(set(args.rows) - set(common.ROWS))
    if unknown or not args.rows:
        parser.error(f"--rows: {unknown or 'none given'}; rows are {list(common.ROWS)}")
    args.llama_batches = ints(args.llama_batches, "llama-batches")
    args.torch_variants = [v.strip() for v in args.torch_variants.split(",") if v.strip()]
    bad = sorted(set(args.torch_variants) - {"eager", "compile"})
    if bad:
        parser.error(f"--torch-variants: unknown {bad}; choose from eager, compile")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1 (the first call compiles)")
    if not smoke and args.steps < 20:
        print(f"[suite] note: --steps={args.steps} is below the issue's 20", file=sys.stderr)
    return args


def run_suite(args: argparse.Namespace) -> dict:
    """Runs the selected rows; returns {"entries", "matmul", "markdown", "errors"}."""
    env = common.environment()
    if not (args.isolate or args.smoke) and "jax" not in sys.modules:
        # Both frameworks share this process's device: keep JAX from reserving 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.isolate:

        def measure(spec):
            return measure_isolated(spec, args.child_timeout)

    else:
        measure = measure_in_process

    base = dict(steps=args.steps, warmup=args.warmup, dtype=args.dtype, fast_compile=args.smoke)
    base["attention"] = args.attention
    matmul = measure(
        {"kind": "matmul", "n": args.matmul_size, "dtype": args.dtype, "repeats": args.steps}
    )
    if _ok(matmul) and matmul["backend"] == "cpu" and not (args.smoke or args.allow_cpu):
        raise SystemExit(
            "suite.py: JAX sees no accelerator (backend cpu). The full-size suite is meant for a "
            "GPU (install jax[cuda12] and a CUDA build of torch there); use --smoke for the CPU "
            "harness check, or --allow-cpu to run full size anyway."
        )
    require_cuda = not (args.smoke or args.allow_cpu)
    itemsize = 2 if args.dtype == "bfloat16" else 4

    def measure_case(case: common.Case, index: int) -> dict:
        spec = {**base, "case": case.to_json()}
        entry = {
            "case": case,
            "index": index,
            "peak_isolated": args.isolate,
            "layer_itemsize": itemsize,
            "jax": measure({**spec, "kind": "jax"}),
            "torch": {},
        }
        for variant in args.torch_variants:
            torch_spec = {**spec, "kind": "torch", "variant": variant, "require_cuda": require_cuda}
            entry["torch"][variant] = measure(torch_spec)
        return entry

    entries = []
    for row in args.rows:
        if row == 5:  # the largest batch of --llama-batches at which both frameworks fit
            too_big = []
            for i, batch in enumerate(args.llama_batches):
                (case,) = common.cases_for_row(5, args.smoke, llama_batch=batch)
                entry = measure_case(case, 0)
                results = [entry["jax"], *entry["torch"].values()]
                if not any(_is_oom(r) for r in results) or i == len(args.llama_batches) - 1:
                    break
                too_big.append(batch)
                print(
                    f"[suite] row 5: out of memory at batch {batch}; trying a smaller one",
                    file=sys.stderr,
                )
            entry["out_of_memory_at"] = too_big
            entries.append(entry)
        else:
            for index, case in enumerate(common.cases_for_row(row, args.smoke)):
                entries.append(measure_case(case, index))

    evaluate_targets(entries, matmul)
    settings = {
        "smoke": args.smoke,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch_variants": args.torch_variants,
        "isolate": args.isolate,
        "attention": args.attention,
    }
    section = render(env, settings, matmul, entries)
    errors = [] if _ok(matmul) else [f"matmul: {matmul['error']}"]
    for entry in entries:
        torch_results = [(f"torch {v}", r) for v, r in entry["torch"].items()]
        for name, result in [("pifi_jax", entry["jax"]), *torch_results]:
            if not _ok(result):
                errors.append(f"row {entry['case'].row} {entry['case'].label} {name}: {result}")
    return {"entries": entries, "matmul": matmul, "markdown": section, "errors": errors}


def dry_run(args: argparse.Namespace) -> dict:
    """Lowers every selected case's pifi_jax step (full size unless --smoke) without running it."""
    rows, errors = [], []
    for row in args.rows:
        batches = args.llama_batches[:1] if row == 5 else [None]
        for case in common.cases_for_row(row, args.smoke, llama_batch=batches[0]):
            print(f"[suite] lowering row {row} {case.label}", file=sys.stderr, flush=True)
            try:
                r = jax_lower(case, dtype=args.dtype)
            except Exception as err:  # report every case, then fail
                traceback.print_exc()
                errors.append(f"row {row} {case.label}: {type(err).__name__}: {err}")
                continue
            rows.append(
                [
                    str(row),
                    case.label,
                    common.fmt_count(r["trainable_params"]),
                    common.fmt_count(r["frozen_params"]),
                    common.fmt_bytes(r["trainable_bytes"] + r["opt_state_bytes"]),
                    common.fmt_bytes(r["frozen_bytes"]),
                    f"{r['model_flops'] / 1e12:.2f}",
                    f"{r['lower_s']:.1f}",
                ]
            )
    header = ("row", "case", "trainable", "frozen", "trainable + AdamW", "frozen weights")
    header += ("model TFLOP / step", "lower s")
    table = common.markdown_table(header, rows, "llrrrrrr")
    print(table)
    return {"markdown": table, "errors": errors}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        if args.worker_out is None:
            raise SystemExit("--worker needs --worker-out")
        worker_main(args.worker, args.worker_out)
        return {}
    if args.dry_run:
        report = dry_run(args)
        for error in report["errors"]:
            print(f"[suite] FAILED {error}", file=sys.stderr)
        return report
    report = run_suite(args)
    append_report(Path(args.out), report["markdown"])
    print(report["markdown"])
    print(f"[suite] appended to {args.out}", file=sys.stderr)
    for error in report["errors"]:
        print(f"[suite] FAILED {error}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(1 if main().get("errors") else 0)
