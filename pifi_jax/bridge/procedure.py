"""The whole transfer, stage by stage, in one run directory (launch.transfer drives it).

    <workdir>/slm/               stage 1: the SLM's PEFT run (the trainer; resumable)
    <workdir>/depth_map.json     stage 2: which SLM layer serves each LLM layer
    <workdir>/fisher.npz         stage 3: the LLM's Fisher importance on task data
    <workdir>/bridge/            stage 3: the bridge checkpoint (+ bridge.json, the kept indices)
    <workdir>/transfer_init.npz  stage 4: the SLM's modules, fitted W_plug, W_down = selection
    <workdir>/adapt/             stage 4: their training through the bridge (the trainer)
    <workdir>/evaluate/          stage 5: the LLM with the modules plugged in, evaluated; its
                                 adapter/ is a Hugging Face PEFT adapter of the LLM (LoRA, prefix)
                                 or pifi_jax's native adapter file (bottleneck adapters)
    <workdir>/transfer.json      the stages' results side by side

Every file is written whole or not at all (temporary name, then rename), so a stage that was
killed is redone, and a stage whose output exists is skipped.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import multiprocessing
import os
import resource
import shutil
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pifi_jax import data, peft
from pifi_jax.bridge import adapt, fisher, fisher_seq2seq, mapping, plug, seq2seq_bridge
from pifi_jax.bridge import arch as arch_lib
from pifi_jax.bridge import seq2seq_plug as s2s
from pifi_jax.bridge.prune import prune as prune_llm
from pifi_jax.bridge.prune import save_bridge, select
from pifi_jax.bridge.run import load_tree, save_tree
from pifi_jax.hub import from_pretrained
from pifi_jax.hub.pretrained import _flatten, open_checkpoint
from pifi_jax.models import registry, t5
from pifi_jax.train import loop

STAGES = ("slm", "fisher", "bridge", "adapt", "evaluate")
# The paper's comparison besides the procedure (run_direct, run_bridge_only, run_llm_peft).
STUDY = ("llm_peft", "direct", "bridge_only")
# transfer.json's record of each isolated stage's peak resident host memory, in bytes.
HOST_PEAK = "host_peak_bytes"


# transfer.method -> the SLM's peft.method values that make its modules.
PEFT_METHODS = {
    "lora": ("lora",),
    "adapter": ("adapter_houlsby", "adapter_pfeiffer"),
    "prefix": ("prefix",),
}


def check_config(config) -> None:
    t = config.transfer
    if t.method not in PEFT_METHODS:
        raise ValueError(f"transfer.method={t.method!r}: choose one of {sorted(PEFT_METHODS)}")
    allowed = PEFT_METHODS[t.method]
    if config.peft.method not in allowed:
        raise ValueError(
            f"transfer.method={t.method!r} carries the SLM's {t.method} modules: peft.method must "
            f"be one of {list(allowed)}, got {config.peft.method!r} "
            f"(configs/transfer.py:method={t.method} sets both)"
        )
    if t.method == "adapter" and peft.config.from_flat_config(config.peft).train_layernorms:
        raise ValueError(
            "transfer.method='adapter': set peft.train_layernorms=false (the SLM's norm weights "
            "have no counterpart in the LLM, so what they learnt would not carry over)"
        )
    if t.method == "prefix" and config.peft.prefix_projection:
        raise ValueError(
            "transfer.method='prefix': set peft.prefix_projection=false (the SLM's prefix MLP "
            "has no counterpart in the LLM; its table is what carries over)"
        )
    (s2s if is_seq2seq(config) else plug).check_sites(t.method, sites_of(config))


def _model_config(path):
    _, hf = open_checkpoint(str(path))
    return registry.config_from_hf(hf)


def _model_type(path) -> str:
    return _model_config(path).model_type


def _family(path) -> arch_lib.Arch | str:
    """A decoder's family (arch.py), or seq2seq_plug.FAMILY for a T5 model."""
    model_type = _model_type(path)
    if model_type in t5.MODEL_TYPES:
        return s2s.FAMILY
    return arch_lib.arch_for(SimpleNamespace(model_type=model_type))


def _name(family) -> str:
    return family if isinstance(family, str) else family.name


def is_seq2seq(config) -> bool:
    """Whether the config's SLM (and so, checked, its LLM) is an encoder-decoder (T5)."""
    return _family(config.model.path) == s2s.FAMILY


def check_families(config) -> arch_lib.Arch | str:
    """The pair's family (arch.py's, or T5's): both models of one, whose module names the
    sites are."""
    slm, llm = _family(config.model.path), _family(config.transfer.llm)
    if slm != llm:
        raise ValueError(
            f"bridge transfer needs an SLM and an LLM of one architecture: the SLM "
            f"{config.model.path} is {_name(slm)}'s, the LLM {config.transfer.llm} {_name(llm)}'s"
        )
    return slm


def sites_of(config) -> tuple[str, ...]:
    """Where the SLM's modules sit: the LoRA targets of the config's peft section
    (comma-separated names), the projections its adapters follow, or its family's prefix sites;
    with peft.target_modules empty, the family's defaults (LoRA: PEFT's, adapters: arch.py)."""
    arch = _family(config.model.path)
    names = tuple(n.strip() for n in str(config.peft.target_modules).split(",") if n.strip())
    if arch == s2s.FAMILY:  # T5: each LoRA target or adapter projection at all its sites
        if config.transfer.method == "adapter":
            return s2s.adapter_sites_for(config.peft.method.removeprefix("adapter_"), names)
        s2s.check_sites(config.transfer.method, s2s.SITES)  # refuses a prefix
        slm_config = _model_config(config.model.path)
        return s2s.sites_for(names or peft.targets.LORA_TARGETS[slm_config.model_type], slm_config)
    if config.transfer.method == "prefix":
        return plug.prefix_sites(arch)
    if names:
        return names
    if config.transfer.method == "adapter":
        return arch.sites.adapter_defaults[config.peft.method.removeprefix("adapter_")]
    return tuple(peft.targets.LORA_TARGETS[_model_type(config.model.path)])


def _llm_config(path: str):
    config = _model_config(path)
    if s2s.is_seq2seq(config):
        fisher_seq2seq.check_family(config)
    else:
        fisher.check_family(config)
    return config


# What a stage's batch holds, per layout.
BATCH_KEYS = {
    "causal_lm": ("input_ids", "attention_mask", "loss_mask"),
    "seq2seq": ("input_ids", "attention_mask", "target_ids", "target_mask"),
}


def _model_task(config) -> str:
    """from_pretrained's task (and the data layout) of the pair's models."""
    return "seq2seq" if is_seq2seq(config) else "causal_lm"


def task_batches(config, tokenizer, examples: int, batch_size: int) -> list[dict]:
    """The first `examples` training examples of the config's task, as batches of the pair's
    layout (causal-LM, or seq2seq for T5)."""
    task = data.task_for_config(config)
    layout = _model_task(config)
    encoded = loop.load_splits(config, tokenizer, task, layout=layout)["train"]
    n = min(examples, len(encoded))
    for field in ("input_ids", "prompt_lengths", "target_ids", "references"):
        if getattr(encoded, field) is not None:
            setattr(encoded, field, getattr(encoded, field)[:n])
    batcher = data.Batcher(
        encoded,
        batch_size,
        tuple(config.data.buckets),
        shuffle=False,
        seed=config.seed,
        drop_remainder=False,
        target_buckets=tuple(config.data.get("target_buckets", ())),
    )
    return [{k: b[k] for k in BATCH_KEYS[layout]} for b in batcher.batches(0)]


def check_tokenizers(config):
    slm_tok = data.load_tokenizer(str(config.model.tokenizer or config.model.path))
    llm_tok = data.load_tokenizer(str(config.transfer.llm))
    mapping.check_same_tokenizer(slm_tok, llm_tok, str(config.model.path), str(config.transfer.llm))
    return llm_tok


def _stage_config(config, **changes):
    out = copy.deepcopy(config)
    with out.unlocked():
        for key, value in changes.items():
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return out


def run_slm(config, workdir: Path, log=print) -> dict:
    return loop.train_unless_finished(config, workdir / "slm", "stage slm", log=log)


def run_fisher(config, workdir: Path, log=print) -> Path:
    out = workdir / "fisher.npz"
    llm_tok = check_tokenizers(config)
    llm_config = _llm_config(str(config.transfer.llm))
    slm_config = _model_config(config.model.path)
    seq2seq = is_seq2seq(config)
    if seq2seq:
        stacks = {s: (s2s.depth(slm_config, s), s2s.depth(llm_config, s)) for s in s2s.STACKS}
        mapping.write_stack_depth_maps(workdir / "depth_map.json", stacks)
    else:
        mapping.write_depth_map(
            workdir / "depth_map.json", slm_config.num_layers, llm_config.num_layers
        )
    if out.is_file():
        log(f"stage fisher: {loop.DONE_EARLIER} ({out})")
        return out
    t = config.transfer
    batches = task_batches(config, llm_tok, t.fisher_examples, t.fisher_batch_size)
    log(f"stage fisher: {sum(len(b['input_ids']) for b in batches)} examples through {t.llm}")
    scores = fisher_seq2seq.seq2seq_fisher_scores if seq2seq else fisher.fisher_scores
    scores(str(t.llm), batches, log=log).save(out)
    return out


def run_bridge(config, workdir: Path, log=print) -> Path:
    out = workdir / "bridge"
    if (out / "bridge.json").is_file():
        log(f"stage bridge: {loop.DONE_EARLIER} ({out})")
        return out
    t = config.transfer
    llm_config = _llm_config(str(t.llm))
    if is_seq2seq(config):
        scores = fisher_seq2seq.Seq2SeqFisherScores.load(workdir / "fisher.npz")
        selection = seq2seq_bridge.select_seq2seq(scores, llm_config, t.reduction)
        module, params = seq2seq_bridge.prune_seq2seq(str(t.llm), selection, log=log)
    else:
        scores = fisher.FisherScores.load(workdir / "fisher.npz")
        selection = select(scores, llm_config, t.reduction)
        module, params = prune_llm(str(t.llm), selection, log=log)
    tmp = workdir / "bridge.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_bridge(
        module,
        params,
        tmp,
        llm=str(t.llm),
        selection=selection,
        reduction=t.reduction,
        scores=scores,
    )
    tmp.rename(out)
    c = module.config
    width, heads = (
        (c.d_model, c.num_heads) if is_seq2seq(config) else (c.hidden_size, c.num_attention_heads)
    )
    log(f"stage bridge: {out} (hidden {width}, {heads} heads)")
    return out


def _slm_modules(config, workdir: Path):
    """The SLM's trained modules, stacked per site (plug.slm_modules), from stage 1's adapter
    directory."""
    adapter = workdir / "slm" / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter}: run the slm stage first")
    module, params = from_pretrained(
        str(config.model.path),
        task=_model_task(config),
        peft=peft.config.from_flat_config(config.peft),
        log=lambda s: None,
    )
    return _stacked(config, _flatten(peft.load_adapter(module, params, adapter)), module.config)


def _stacked(config, flat: dict, model_config) -> dict:
    """A PEFT model's per-layer modules (flat params) stacked per site."""
    if is_seq2seq(config):
        return s2s.slm_modules(flat, sites_of(config), model_config)
    t = config.transfer
    return plug.slm_modules(flat, t.method, sites_of(config), model_config.num_layers)


def _make_init(config, workdir: Path, log) -> Path:
    """transfer_init.npz: the SLM's modules, W_plug fitted on task tokens, W_down = selection."""
    init = workdir / "transfer_init.npz"
    if init.is_file():
        return init
    t = config.transfer
    modules = _slm_modules(config, workdir)
    quiet = dict(task=_model_task(config), log=lambda s: None)
    slm = from_pretrained(str(config.model.path), **quiet)
    llm = from_pretrained(str(t.llm), **quiet)
    batches = task_batches(config, check_tokenizers(config), t.plug_examples, t.fisher_batch_size)
    if is_seq2seq(config):
        fitted = s2s.fit_plug(slm, llm, batches, modules, ridge=t.ridge)
    else:
        fitted = plug.fit_plug(slm, llm, batches, modules, method=t.method, ridge=t.ridge)
    del llm
    bridge_json = json.loads((workdir / "bridge" / "bridge.json").read_text(encoding="utf-8"))
    selection = seq2seq_bridge.selection_from_json(bridge_json["selection"])
    save_tree(adapt.init_transfer(modules, fitted, selection, _llm_config(str(t.llm))), init)
    log(f"stage adapt: W_plug fitted on {sum(len(b['input_ids']) for b in batches)} examples")
    return init


def _fresh_modules(config, workdir: Path) -> Path:
    """The ablation "bridge alone": transfer_init.npz with the SLM's modules replaced by
    untrained ones, as the method initialises them (LoRA: A random, B = 0; adapters: down
    random, up = 0; a prefix N(0, 1)), of the same shapes and seed."""
    out = workdir / "bridge_only" / "transfer_init.npz"
    if out.is_file():
        return out
    tree = load_tree(_make_init(config, workdir, print))
    module, params = from_pretrained(
        str(config.model.path),
        task=_model_task(config),
        peft=peft.config.from_flat_config(config.peft),
        seed=config.seed,
        log=lambda s: None,
    )
    tree["modules"] = _stacked(config, _flatten(params), module.config)
    return save_tree(tree, out)


def _adapt(config, init: Path, workdir: Path, bridge_dir: Path, name: str, log) -> dict:
    stage = _stage_config(
        config,
        builder="bridge",
        **{
            "model.path": str(bridge_dir),
            "model.tokenizer": str(bridge_dir),
            "bridge.stage": "adapt",
            "bridge.init": str(init),
            "train.epochs": config.transfer.adapt_epochs,
        },
    )
    return loop.train_unless_finished(stage, workdir, name, log=log)


def _evaluate(config, trained: Path, workdir: Path, name: str, log) -> dict:
    if not trained.is_file():
        raise FileNotFoundError(f"{trained}: run the adapt stage first")
    load_tree(trained)  # refuses a damaged file before the LLM is loaded
    stage = _stage_config(
        config,
        builder="bridge",
        **{
            "model.path": str(config.transfer.llm),
            "bridge.stage": "llm",
            "bridge.trained": str(trained),
            "train.epochs": 0,
            "train.num_steps": 0,
        },
    )
    return loop.train_unless_finished(stage, workdir, name, log=log)


def run_adapt(config, workdir: Path, log=print) -> dict:
    init = _make_init(config, workdir, log)
    return _adapt(config, init, workdir / "adapt", workdir / "bridge", "stage adapt", log)


def run_evaluate(config, workdir: Path, log=print) -> dict:
    trained = workdir / "adapt" / "adapter" / "transfer.npz"
    return _evaluate(config, trained, workdir / "evaluate", "stage evaluate", log)


def run_direct(config, workdir: Path, log=print) -> dict:
    """Ablation: the SLM's modules plugged into the LLM through the fitted W_plug, no bridge."""
    init = _make_init(config, workdir, log)
    return _evaluate(config, init, workdir / "direct", "study direct", log)


def run_bridge_only(config, workdir: Path, log=print) -> dict:
    """Ablation: untrained modules adapted through the bridge alone (no SLM learning)."""
    init = _fresh_modules(config, workdir)
    out = workdir / "bridge_only"
    _adapt(config, init, out / "adapt", workdir / "bridge", "study bridge_only (adapt)", log)
    trained = out / "adapt" / "adapter" / "transfer.npz"
    return _evaluate(config, trained, out / "evaluate", "study bridge_only", log)


def run_llm_peft(config, workdir: Path, log=print) -> dict:
    """The upper reference: the same PEFT method trained on the LLM directly (its gradients)."""
    stage = _stage_config(config, **{"model.path": str(config.transfer.llm)})
    return loop.train_unless_finished(stage, workdir / "llm_peft", "study llm_peft", log=log)


_RUNNERS = {
    "slm": run_slm,
    "fisher": run_fisher,
    "bridge": run_bridge,
    "adapt": run_adapt,
    "evaluate": run_evaluate,
    "direct": run_direct,
    "bridge_only": run_bridge_only,
    "llm_peft": run_llm_peft,
}
# What each study row is: the stage whose metrics it reports.
STUDY_ROWS = (
    ("PEFT on the SLM", "slm"),
    ("PEFT on the LLM directly (its gradients)", "llm_peft"),
    ("transferred, without the bridge", "direct"),
    ("transferred through the bridge", "evaluate"),
    ("the bridge alone (no SLM modules)", "bridge_only"),
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _run_stage(config, workdir: Path, stage: str, log=print):
    """One stage; returns (its trainer metrics or None, this process's id, its peak resident
    host memory in bytes so far, whether it skipped work finished earlier)."""
    skipped = []

    def watch(message, *args, **kwargs):
        if loop.DONE_EARLIER in str(message):
            skipped.append(message)
        return log(message, *args, **kwargs)

    out = _RUNNERS[stage](config, workdir, watch)
    if isinstance(out, dict):
        out = {k: float(np.asarray(v)) for k, v in out.items()}
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024
    return (out if isinstance(out, dict) else None), os.getpid(), peak, bool(skipped)


def _run_isolated(config, workdir: Path, stage: str):
    """`stage` in a fresh spawned process, which gives every byte of host memory back when it
    ends. Its output goes to this process's stdout/stderr; its exceptions are raised here."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_run_stage, config, workdir, stage).result()
        except BrokenProcessPool as e:
            raise RuntimeError(
                f"transfer stage {stage!r} died without a Python error (killed for memory?); "
                f"run it alone with --stage={stage} to see why"
            ) from e


def run(config, workdir: str | Path, stages=STAGES, log=print, isolate: bool = False) -> dict:
    """Runs `stages` in order (STAGES, and the study's direct / bridge_only / llm_peft);
    returns what each trainer stage reported, also gathered in <workdir>/transfer.json.

    isolate: each stage in its own spawned process (logging with print), the next one starting
    when it has ended. Stages of a real pair in one process do not give all their host memory
    back, though no jax array outlives a stage: on the Qwen2.5-Coder 0.5B -> 1.5B pair, the
    five stages and llm_peft in one process passed 24 GB and were killed. launch.transfer
    isolates whenever it runs more than one stage."""
    check_families(config)
    check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in stages if s not in _RUNNERS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages: {tuple(_RUNNERS)}")
    results = {}
    summary_path = workdir / "transfer.json"
    for stage in stages:
        summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else {}
        if isolate:
            out, pid, peak, skipped = _run_isolated(config, workdir, stage)
            if skipped:  # the peak recorded when it ran stands
                log(f"{stage}: {loop.DONE_EARLIER}, in process {pid}")
            else:
                log(f"{stage}: ran in process {pid}, peak host memory {peak / 2**30:.2f} GiB")
                summary.setdefault(HOST_PEAK, {})[stage] = peak
        else:
            out = _run_stage(config, workdir, stage, log)[0]
        if out is not None:
            results[stage] = summary[stage] = out
        _atomic_write(summary_path, json.dumps(summary, indent=2) + "\n")
    return results


def study_table(workdir: str | Path, metric: str) -> str:
    """A markdown table of the study's rows that have run (transfer.json): validation and test
    `metric`, and the peak host memory of each stage's process where it ran isolated."""
    summary = json.loads((Path(workdir) / "transfer.json").read_text(encoding="utf-8"))
    peaks = summary.get(HOST_PEAK, {})
    lines = [f"| run | validation {metric} | test {metric} |", "|---|---:|---:|"]
    if peaks:
        lines = [lines[0] + " peak host GiB |", lines[1] + "---:|"]
    for name, stage in STUDY_ROWS:
        if stage in summary:
            r = summary[stage]
            val, test = r.get(f"validation/{metric}"), r.get(f"test/{metric}")
            # generation metrics are already in 0..100 (text_metrics.generation_metrics)
            cells = ["-" if v is None else f"{v:.2f}" for v in (val, test)]
            if peaks:
                cells.append("-" if stage not in peaks else f"{peaks[stage] / 2**30:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
