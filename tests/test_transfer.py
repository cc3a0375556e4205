"""launch.transfer / pifi_jax.bridge.procedure: every stage on a tiny SLM -> LLM pair, resume,
and the exported adapter loading in Hugging Face PEFT."""

import json
import re

import numpy as np
import pytest
import torch
import transformers

from tests.conftest import load_config, tiny_word_tokenizer, write_tiny_decoder


def write_tiny_llm(directory):
    """A 48-wide, 3-layer Qwen2 with the SLM's tiny tokenizer."""
    fast = tiny_word_tokenizer(directory, bos=True)
    torch.manual_seed(5)
    config = transformers.Qwen2Config(
        vocab_size=len(fast), hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer_pair")
    return write_tiny_decoder(root / "slm", "qwen2"), write_tiny_llm(root / "llm")


def _config(pair, files, extra=(), method="lora"):
    slm, llm = pair
    overrides = ["--config.data.source=local"]
    overrides += [f"--config.data.data_files.{k}={v}" for k, v in files.items()]
    return load_config(
        f"configs/transfer.py:slm={slm},llm={llm},task=pairs,method={method},runlocal",
        [*overrides, *extra],
    )


def test_every_stage_runs_and_a_second_run_skips_them(
    pair, tiny_pair_files, tmp_path, monkeypatch, capsys
):
    from pifi_jax.bridge import fisher, procedure

    config = _config(pair, tiny_pair_files)
    results = procedure.run(
        config, tmp_path, procedure.STAGES + procedure.STUDY, log=lambda *a: None
    )
    for name in ("depth_map.json", "fisher.npz", "bridge/bridge.json", "transfer_init.npz"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "depth_map.json").read_text())["llm_to_slm"] == [0, 0, 1]
    assert (tmp_path / "adapt" / "adapter" / "transfer.npz").is_file()
    for stage in ("slm", "adapt", "evaluate"):
        assert "test/rougeL" in results[stage], stage
    summary = json.loads((tmp_path / "transfer.json").read_text())
    assert set(summary) == {"slm", "adapt", "evaluate", "llm_peft", "direct", "bridge_only"}
    table = procedure.study_table(tmp_path, "rougeL").splitlines()
    assert len(table) == 2 + 5 and table[1] == "|---|---:|---:|"
    direct = summary["direct"]["test/rougeL"]
    assert f"| {direct:.2f} |" in next(r for r in table if "without the bridge" in r)
    # the bridge-alone ablation starts from untrained modules (B = 0), the SLM's are trained
    from pifi_jax.bridge.run import load_tree as _load

    fresh = _load(tmp_path / "bridge_only" / "transfer_init.npz")["modules"]
    learnt = _load(tmp_path / "transfer_init.npz")["modules"]
    for t in fresh:
        assert not np.asarray(fresh[t]["b"]).any() and np.asarray(learnt[t]["b"]).any()
    # the exported adapter is a PEFT adapter of the LLM that peft loads, with the plugged modules
    import peft as hf_peft

    base = transformers.AutoModelForCausalLM.from_pretrained(pair[1])
    model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "evaluate" / "adapter"))
    lora = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora and all(p.abs().max() > 0 for p in lora.values())
    # the adaptation trained: its modules moved off their initial values
    from pifi_jax.bridge.run import load_tree

    start = load_tree(tmp_path / "transfer_init.npz")
    end = load_tree(tmp_path / "adapt" / "adapter" / "transfer.npz")
    assert np.abs(np.asarray(end["down"]) - np.asarray(start["down"])).max() > 0
    # the memory benchmark reads the run directory and compiles each arm's step
    from benchmarks import bridge_memory

    bridge_memory.main(["--workdir", str(tmp_path), "--batch", "2", "--length", "32"])
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if r.startswith("| ") and "GiB" not in r]
    assert len(rows) == 4 and "through the bridge" in rows[1] and "arithmetic" in rows[3]
    # a second run redoes nothing
    monkeypatch.setattr(fisher, "fisher_scores", lambda *a, **k: pytest.fail("fisher redone"))
    again = procedure.run(config, tmp_path, procedure.STAGES + procedure.STUDY, log=lambda *a: None)
    assert again["evaluate"] == results["evaluate"]


def write_tiny_gpt2_llm(directory):
    """A 48-wide, 3-layer GPT-2 with the GPT-2 SLM's tiny tokenizer."""
    fast = tiny_word_tokenizer(directory)
    torch.manual_seed(6)
    config = transformers.GPT2Config(
        vocab_size=len(fast), n_embd=48, n_head=6, n_layer=3, n_positions=128,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def write_tiny_t5_llm(directory):
    """A 48-wide T5 with 3 encoder and 3 decoder blocks and the tiny tokenizer (eos behind)."""
    fast = tiny_word_tokenizer(directory, eos=True)
    torch.manual_seed(7)
    config = transformers.T5Config(
        vocab_size=len(fast), pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
        d_model=48, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=6,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


def test_a_t5_pair_transfers_lora_through_every_stage(tiny_pair_files, tmp_path, monkeypatch):
    import peft as hf_peft

    from pifi_jax.bridge import fisher_seq2seq, procedure
    from pifi_jax.bridge.run import load_tree
    from tests.conftest import write_tiny_seq2seq

    slm = write_tiny_seq2seq(tmp_path / "slm", "t5")  # 32 wide, 2 + 2 blocks
    llm = write_tiny_t5_llm(tmp_path / "llm")
    config = _config((slm, llm), tiny_pair_files)
    assert procedure.sites_of(config) == (
        "encoder.q", "decoder.q", "cross.q", "encoder.v", "decoder.v", "cross.v",
    )  # fmt: skip
    run = tmp_path / "run"
    # the five stages (the study runs are the same trainer stages, run on the decoder pair)
    results = procedure.run(config, run, procedure.STAGES, log=lambda *a: None)
    for stage in ("slm", "adapt", "evaluate"):
        assert "test/rougeL" in results[stage], stage
    depth = json.loads((run / "depth_map.json").read_text())
    assert depth["encoder"]["llm_to_slm"] == depth["decoder"]["llm_to_slm"] == [0, 0, 1]
    bridge_config = json.loads((run / "bridge" / "config.json").read_text())
    assert bridge_config["model_type"] == "t5" and bridge_config["d_model"] == 12  # 48 / 4
    start, end = load_tree(run / "transfer_init.npz"), load_tree(run / "adapt/adapter/transfer.npz")
    assert np.abs(np.asarray(end["down"]) - np.asarray(start["down"])).max() > 0
    assert np.abs(end["plug"]["cross.v"]["in"] - start["plug"]["cross.v"]["in"]).max() > 0
    # the exported LoRA is a Hugging Face PEFT adapter of transformers' T5 that changes it
    source, target = torch.tensor([[4, 5, 6, 3]]), torch.tensor([[0, 7, 8]])
    base = transformers.T5ForConditionalGeneration.from_pretrained(llm).eval()
    plain = base(input_ids=source, decoder_input_ids=target).logits
    model = hf_peft.PeftModel.from_pretrained(base, str(run / "evaluate" / "adapter"))
    assert sum("EncDecAttention.v.lora_B" in n for n, _ in model.named_parameters()) == 3
    assert (model(input_ids=source, decoder_input_ids=target).logits - plain).abs().max() > 1e-4
    # a second run redoes nothing
    monkeypatch.setattr(
        fisher_seq2seq, "seq2seq_fisher_scores", lambda *a, **k: pytest.fail("fisher redone")
    )
    again = procedure.run(config, run, procedure.STAGES, log=lambda *a: None)
    assert again["evaluate"] == results["evaluate"]
    # what a T5 pair cannot carry, refused by name
    with pytest.raises(ValueError, match="no prefix tuning for T5"):
        procedure.run(_config((slm, llm), tiny_pair_files, method="prefix"), tmp_path / "r2")
    with pytest.raises(ValueError, match=r"T5 LoRA supports the targets .* got 'o'"):
        targets = ["--config.peft.target_modules=q,o"]
        procedure.run(_config((slm, llm), tiny_pair_files, targets), tmp_path / "r3")


@pytest.mark.slow  # the adapter sites are tested against transformers in test_transfer_t5.py
def test_a_t5_pair_transfers_houlsby_adapters_through_every_stage(tiny_pair_files, tmp_path):
    from pifi_jax.bridge import procedure
    from pifi_jax.bridge.run import load_tree
    from tests.conftest import write_tiny_seq2seq

    slm = write_tiny_seq2seq(tmp_path / "slm", "t5")
    llm = write_tiny_t5_llm(tmp_path / "llm")
    config = _config((slm, llm), tiny_pair_files, method="adapter")
    assert procedure.sites_of(config) == (
        "encoder.o", "decoder.o", "cross.o", "encoder.wo", "decoder.wo",
    )  # fmt: skip
    run = tmp_path / "run"
    results = procedure.run(config, run, procedure.STAGES, log=lambda *a: None)
    for stage in ("slm", "adapt", "evaluate"):
        assert "test/rougeL" in results[stage], stage
    start, end = load_tree(run / "transfer_init.npz"), load_tree(run / "adapt/adapter/transfer.npz")
    assert np.abs(np.asarray(end["down"]) - np.asarray(start["down"])).max() > 0
    assert set(start["plug"]) == set(procedure.sites_of(config))
    # the LLM's adapters (pifi_jax's format) load into the T5 LLM and change its outputs
    from pifi_jax import peft
    from pifi_jax.hub import from_pretrained
    from tests.test_bridge_t5 import _logits

    base = from_pretrained(llm, task="seq2seq", log=lambda s: None)
    module, params = peft.wrap(*base, peft.config.from_flat_config(config.peft), seed=3)
    loaded = peft.load_adapter(module, params, run / "evaluate" / "adapter")
    batch = {"input_ids": np.array([[4, 5, 6, 3]]), "attention_mask": np.ones((1, 4), np.int32),
             "target_ids": np.array([[7, 8, 3]]), "target_mask": np.ones((1, 3), np.int32)}  # fmt: skip
    assert np.abs(_logits(module, loaded, batch) - _logits(*base, batch)).max() > 1e-4


@pytest.mark.slow  # GPT-2's sites are tested against transformers in tests/test_bridge_gpt2.py
def test_a_gpt2_pair_transfers_lora_on_c_attn_through_every_stage(tiny_pair_files, tmp_path):
    from pifi_jax.bridge import procedure

    slm = write_tiny_decoder(tmp_path / "slm", "gpt2")
    llm = write_tiny_gpt2_llm(tmp_path / "llm")
    config = _config((slm, llm), tiny_pair_files)
    assert procedure.sites_of(config) == ("c_attn",)  # GPT-2's PEFT default
    results = procedure.run(config, tmp_path / "run", log=lambda *a: None)
    assert "test/rougeL" in results["evaluate"]
    bridge_config = json.loads((tmp_path / "run" / "bridge" / "config.json").read_text())
    assert bridge_config["model_type"] == "gpt2" and bridge_config["n_embd"] < 48
    # the exported LoRA is a Hugging Face PEFT adapter of transformers' GPT-2 (fan_in_fan_out
    # Conv1D targets) that changes its logits
    import peft as hf_peft

    ids = torch.tensor([[4, 5, 6, 7]])
    base = transformers.GPT2LMHeadModel.from_pretrained(llm).eval()
    plain = base(input_ids=ids).logits
    model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "run" / "evaluate" / "adapter"))
    assert model.peft_config["default"].fan_in_fan_out
    assert (model(input_ids=ids).logits - plain).abs().max() > 1e-4
    # Pfeiffer adapters on GPT-2 sit after its MLP output projection
    adapter = _config(
        (slm, llm), tiny_pair_files, ["--config.peft.method=adapter_pfeiffer"], method="adapter"
    )
    assert procedure.sites_of(adapter) == ("mlp.c_proj",)


def test_one_stage_alone_needs_its_inputs(pair, tiny_pair_files, tmp_path):
    from pifi_jax.bridge import procedure

    config = _config(pair, tiny_pair_files)
    with pytest.raises(FileNotFoundError, match="run the adapt stage first"):
        procedure.run(config, tmp_path, stages=("evaluate",))
    with pytest.raises(ValueError, match="unknown stage"):
        procedure.run(config, tmp_path, stages=("prune",))


def test_isolated_stages_run_each_in_a_fresh_process(pair, tiny_pair_files, tmp_path):
    import os

    from pifi_jax.bridge import procedure

    config = _config(pair, tiny_pair_files)
    lines = []
    procedure.run(config, tmp_path, ("fisher", "bridge"), log=lines.append, isolate=True)
    assert (tmp_path / "fisher.npz").is_file() and (tmp_path / "bridge" / "bridge.json").is_file()
    pids = [int(re.search(r"ran in process (\d+)", line).group(1)) for line in lines]
    assert len(pids) == 2 and len({*pids, os.getpid()}) == 3
    peaks = json.loads((tmp_path / "transfer.json").read_text())[procedure.HOST_PEAK]
    assert set(peaks) == {"fisher", "bridge"} and all(v > 2**20 for v in peaks.values())
    # run again, both are skipped: the peaks recorded when they ran stand
    again = []
    procedure.run(config, tmp_path, ("fisher", "bridge"), log=again.append, isolate=True)
    assert [line.split(":")[0] for line in again if "done earlier, in process" in line] == [
        "fisher", "bridge",
    ]  # fmt: skip
    assert json.loads((tmp_path / "transfer.json").read_text())[procedure.HOST_PEAK] == peaks
    # a stage's error in its process is raised here, message and type intact
    with pytest.raises(FileNotFoundError, match="run the adapt stage first"):
        procedure.run(config, tmp_path, stages=("evaluate",), isolate=True)


def test_the_study_table_shows_each_isolated_stages_peak_host_memory(tmp_path):
    from pifi_jax.bridge import procedure

    summary = {
        "slm": {"validation/exact_match": 50.0, "test/exact_match": 25.0},  # 0..100, as logged
        "direct": {"test/exact_match": 75.0},
        procedure.HOST_PEAK: {"slm": 3 * 2**30},
    }
    (tmp_path / "transfer.json").write_text(json.dumps(summary))
    table = procedure.study_table(tmp_path, "exact_match").splitlines()
    assert table[0].endswith("| peak host GiB |") and table[1] == "|---|---:|---:|---:|"
    assert table[2] == "| PEFT on the SLM | 50.00 | 25.00 | 3.00 |"
    assert table[3] == "| transferred, without the bridge | - | 75.00 | - |"


def test_adapters_transfer_through_every_stage(pair, tiny_pair_files, tmp_path):
    """transfer.method=adapter: Houlsby adapters of the SLM carried into the LLM through the
    bridge; the LLM's adapters are saved in pifi_jax's native format and load onto it."""
    import jax.numpy as jnp

    import pifi_jax
    from pifi_jax.bridge import adapt, procedure
    from pifi_jax.bridge.run import load_tree
    from pifi_jax.hub.pretrained import _flatten

    llm = pair[1]
    config = _config(pair, tiny_pair_files, method="adapter")
    assert procedure.sites_of(config) == ("o_proj", "down_proj")
    results = procedure.run(config, tmp_path, procedure.STAGES, log=lambda *a: None)
    assert "test/rougeL" in results["evaluate"]
    start = load_tree(tmp_path / "transfer_init.npz")
    assert set(start["modules"]) == {"o_proj", "down_proj"}
    assert set(start["modules"]["o_proj"]) == {"down", "down_bias", "up", "up_bias"}
    end = load_tree(tmp_path / "adapt" / "adapter" / "transfer.npz")
    for site in ("o_proj", "down_proj"):
        for leaf in ("down", "up"):
            moved = np.asarray(end["modules"][site][leaf]) - np.asarray(
                start["modules"][site][leaf]
            )
            assert np.abs(moved).max() > 0, (site, leaf)
        assert np.asarray(start["modules"][site]["up"]).any()  # the SLM's adapters trained
    # the bridge-alone ablation's starting point (its runs are the LoRA test's)
    fresh = load_tree(procedure._fresh_modules(config, tmp_path))["modules"]
    assert not np.asarray(fresh["o_proj"]["up"]).any()  # untrained adapters: up = 0
    # the evaluated LLM's adapter file: native, and it holds the plugged adapters
    saved = tmp_path / "evaluate" / "adapter"
    assert json.loads((saved / "pifi_adapter.json").read_text())["method"] == "adapter"
    cfg = pifi_jax.peft.config.from_flat_config(config.peft)
    module, params = pifi_jax.from_pretrained(
        str(llm), task="causal_lm", peft=cfg, log=lambda s: None
    )
    loaded = _flatten(pifi_jax.peft.load_adapter(module, params, saved))
    want = adapt.llm_leaves(end, module.config)
    assert set(want) == {p for p in loaded if "/adapter_" in p}
    for path, value in want.items():
        np.testing.assert_allclose(
            np.asarray(loaded[path]), np.asarray(jnp.asarray(value)), atol=1e-6
        )


def test_a_prefix_transfers_and_exports_as_a_peft_prefix_of_the_llm(
    pair, tiny_pair_files, tmp_path
):
    """transfer.method=prefix: the SLM's prefix keys / values carried into the LLM through the
    bridge; the evaluated LLM's prefix is a Hugging Face PEFT adapter holding the plugged table."""
    import peft as hf_peft

    from pifi_jax.bridge import adapt, procedure
    from pifi_jax.bridge.run import load_tree

    config = _config(pair, tiny_pair_files, method="prefix")
    results = procedure.run(config, tmp_path, procedure.STAGES, log=lambda *a: None)
    assert "test/rougeL" in results["evaluate"]
    start = load_tree(tmp_path / "transfer_init.npz")
    end = load_tree(tmp_path / "adapt" / "adapter" / "transfer.npz")
    assert "down" not in start and set(start["modules"]) == {"k_proj", "v_proj"}
    for site in ("k_proj", "v_proj"):
        before, after = start["modules"][site]["prefix"], end["modules"][site]["prefix"]
        assert np.abs(np.asarray(after) - np.asarray(before)).max() > 0, site
    base = transformers.AutoModelForCausalLM.from_pretrained(pair[1])
    model = hf_peft.PeftModel.from_pretrained(base, str(tmp_path / "evaluate" / "adapter"))
    table = model.prompt_encoder["default"].embedding.weight.detach().numpy()
    llm_config = procedure._llm_config(str(pair[1]))
    want = np.asarray(adapt.llm_leaves(end, llm_config)["prefix_encoder/embedding"])
    np.testing.assert_allclose(table, want, atol=1e-6)


def test_refusals(pair, tiny_pair_files, tmp_path):
    from pifi_jax.bridge import procedure

    choose = r"transfer.method='ia3': choose one of \['adapter', 'lora', 'prefix'\]"
    with pytest.raises(ValueError, match=choose):
        procedure.run(_config(pair, tiny_pair_files, ["--config.transfer.method=ia3"]), tmp_path)
    with pytest.raises(ValueError, match=r"peft.method must be one of \['prefix'\], got 'lora'"):
        procedure.run(_config(pair, tiny_pair_files, ["--config.transfer.method=prefix"]), tmp_path)
    projected = ["--config.peft.prefix_projection=True"]
    with pytest.raises(ValueError, match="set peft.prefix_projection=false"):
        procedure.run(_config(pair, tiny_pair_files, projected, method="prefix"), tmp_path)
    with pytest.raises(ValueError, match=r"peft.method must be one of \['adapter_houlsby'"):
        procedure.run(
            _config(pair, tiny_pair_files, ["--config.transfer.method=adapter"]), tmp_path
        )
    houlsby = ["--config.transfer.method=adapter", "--config.peft.method=adapter_houlsby"]
    with pytest.raises(ValueError, match="set peft.train_layernorms=false"):
        procedure.run(_config(pair, tiny_pair_files, houlsby), tmp_path)
    sites = [
        *houlsby,
        "--config.peft.train_layernorms=false",
        "--config.peft.target_modules=q_proj",
    ]
    with pytest.raises(ValueError, match=r"adapters supports the sites .* got \['q_proj'\]"):
        procedure.run(_config(pair, tiny_pair_files, sites), tmp_path)
    from configs.transfer import get_config

    with pytest.raises(ValueError, match="method='ia3'; choose lora, adapter or prefix"):
        get_config("method=ia3")
    with pytest.raises(ValueError, match=r"supports the targets .* got \['o_proj'\]"):
        procedure.run(
            _config(pair, tiny_pair_files, ["--config.peft.target_modules=o_proj"]), tmp_path
        )
    other = tmp_path / "other_llm"
    write_tiny_decoder(other, "llama")
    tiny_word_tokenizer(other, bos=False)  # the same words, no <s> in front
    config = _config((pair[0], other), tiny_pair_files)
    with pytest.raises(ValueError, match="encode a probe text differently|differ"):
        procedure.run(config, tmp_path / "run", stages=("fisher",))
    from tests.conftest import write_tiny_seq2seq

    t5_llm = write_tiny_seq2seq(tmp_path / "t5_llm", "t5")
    with pytest.raises(ValueError, match=r"one architecture: the SLM .* llama's, the LLM .*t5's"):
        procedure.run(_config((pair[0], t5_llm), tiny_pair_files), tmp_path / "run3")
    gpt2 = write_tiny_decoder(tmp_path / "gpt2_llm", "gpt2")
    with pytest.raises(ValueError, match=r"one architecture: the SLM .* llama's, the LLM .*gpt2"):
        procedure.run(_config((pair[0], gpt2), tiny_pair_files), tmp_path / "run2")


@pytest.mark.slow
def test_a_stage_killed_while_writing_is_redone(pair, tiny_pair_files, tmp_path, monkeypatch):
    from pifi_jax.bridge import fisher, procedure

    config = _config(pair, tiny_pair_files)
    procedure.run(config, tmp_path, stages=("slm", "fisher"), log=lambda *a: None)
    real_save = procedure.save_bridge

    def dies_half_way(module, params, directory, **kw):
        real_save(module, params, directory, **kw)
        (directory / "bridge.json").unlink()  # killed before its last file
        raise KeyboardInterrupt

    monkeypatch.setattr(procedure, "save_bridge", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        procedure.run(config, tmp_path, stages=("bridge",), log=lambda *a: None)
    assert not (tmp_path / "bridge").exists()  # nothing a later stage could mistake for done
    monkeypatch.setattr(procedure, "save_bridge", real_save)
    # a killed Fisher pass leaves no score file either: np.savez wrote a temporary name
    (tmp_path / "fisher.npz").rename(tmp_path / "fisher.npz.tmp.npz")
    calls = []
    real_scores = fisher.fisher_scores
    monkeypatch.setattr(
        fisher, "fisher_scores", lambda *a, **k: calls.append(1) or real_scores(*a, **k)
    )
    procedure.run(config, tmp_path, stages=("fisher", "bridge"), log=lambda *a: None)
    assert calls == [1] and (tmp_path / "bridge" / "bridge.json").is_file()


@pytest.mark.slow
def test_the_fisher_benchmark_runs_on_launch_transfers_batches(pair, tmp_path, capsys):
    """benchmarks/bridge_fisher.py takes the Fisher stage's batches (procedure.task_batches)
    and reports the pass, the bound and the bridge it prunes."""
    from benchmarks import bridge_fisher

    llm = str(pair[1])
    batches, _ = bridge_fisher.task_batches(llm, "boolq", 3, 32, 2, 0)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32)]  # padded to the batch
    assert sum(int(b["loss_mask"].any(axis=1).sum()) for b in batches) == 3
    bridge_fisher.main(["--llm", llm, "--examples", "3", "--max-length", "32", "--batch", "2"])
    out = capsys.readouterr().out
    assert "| bridge logits finite | True |" in out
    phases = re.findall(r"\|   peak above the start (.+?), GiB \| (-?[\d.]+) \|", out)
    assert len(phases) == 7 and all(float(v) >= 0 for _, v in phases)
    assert re.search(r"\| bridge at r = 16: hidden / heads / kv / MLP \| 12 / 1 / 1 / 16 \|", out)
