"""Loading a real checkpoint: seconds and peak host memory, pifi_jax vs transformers.

    python benchmarks/loading.py                 # appends a section to docs/benchmarks.md
    python benchmarks/loading.py --out=-         # print only
    python benchmarks/loading.py --repeats 3     # each arm 3 times (median seconds, max memory)

The checkpoint is the offline SmolLM2-135M-Instruct GGUF asset (Q4_1 / Q8_0 tensors, dequantized
on load by both libraries). Every arm runs in a fresh child python, alone, in turn, so its peak
resident memory (`ru_maxrss`) is its own; the children's library imports are measured too (an arm
that only imports, and for jax starts its CPU client), so that the loader's own share is the
difference. Arms:

- pifi_jax `from_pretrained(task="causal_lm")`, float32;
- pifi_jax with LoRA (r 8 on q, v), frozen weights cast to bfloat16 after a float32 load (what
  `model.frozen_dtype` did before the loader took it);
- pifi_jax with LoRA and `frozen_dtype=bfloat16`: each frozen tensor stored as bfloat16 as it is
  read;
- transformers `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`, float32 and
  `dtype=torch.bfloat16`.

Seconds are wall time from the first line of the arm to its model being ready (the import is
outside), with jax arrays blocked on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "benchmarks.md"
ASSET = "asset:smollm2"

_PIFI_IMPORT = """
import jax, jax.numpy as jnp
import pifi_jax
from pifi_jax import assets, partition
path = str(assets.locate("asset:smollm2"))
lora = pifi_jax.peft.LoraConfig(r=8, lora_alpha=16.0, target_modules=["q_proj", "v_proj"])
"""
_TORCH_IMPORT = """
import torch, transformers
from pifi_jax import assets
path = assets.locate("asset:smollm2")
"""
ARMS = {
    # the import and the CPU client (which the first array starts)
    "pifi_jax import only": (_PIFI_IMPORT, "jnp.zeros(1).block_until_ready()"),
    "pifi_jax float32": (
        _PIFI_IMPORT,
        """
module, params = pifi_jax.from_pretrained(path, task="causal_lm", log=lambda s: None)
jax.block_until_ready(params)
""",
    ),
    "pifi_jax LoRA, frozen cast to bfloat16 after a float32 load": (
        _PIFI_IMPORT,
        """
module, params = pifi_jax.from_pretrained(path, task="causal_lm", peft=lora, log=lambda s: None)
trainable, frozen = partition.split_params(params, pifi_jax.peft.trainable_rules(module, params))
del params
frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
jax.block_until_ready(frozen)
""",
    ),
    "pifi_jax LoRA, frozen_dtype=bfloat16 (read so)": (
        _PIFI_IMPORT,
        """
module, params = pifi_jax.from_pretrained(
    path, task="causal_lm", peft=lora, frozen_dtype=jnp.bfloat16, log=lambda s: None
)
jax.block_until_ready(params)
""",
    ),
    "transformers import only": (_TORCH_IMPORT, "model = None"),
    "transformers float32 (GGUF)": (
        _TORCH_IMPORT,
        """
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
""",
    ),
    "transformers bfloat16 (GGUF)": (
        _TORCH_IMPORT,
        """
model = transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name, dtype=torch.bfloat16
)
""",
    ),
}
_CHILD = """
import json, resource, sys, time
{imports}
start = time.perf_counter()
{body}
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({{
    "seconds": seconds,
    "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}}))
"""


def run_arm(name: str) -> dict:
    imports, body = ARMS[name]
    code = _CHILD.format(imports=textwrap.dedent(imports), body=textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"arm {name!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def measure(repeats: int) -> dict[str, dict]:
    results = {}
    for name in ARMS:
        runs = [run_arm(name) for _ in range(repeats)]
        results[name] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "maxrss_bytes": max(r["maxrss_bytes"] for r in runs),
        }
        print(f"{name}: {results[name]}", file=sys.stderr)
    return results


def report(results: dict[str, dict], repeats: int) -> str:
    base = {
        "pifi_jax": results["pifi_jax import only"]["maxrss_bytes"],
        "transformers": results["transformers import only"]["maxrss_bytes"],
    }
    rows = []
    for name, r in results.items():
        lib = name.split()[0]
        only = "import only" in name
        rows.append(
            [
                name,
                "-" if only else f"{r['seconds']:.2f}",
                common.fmt_bytes(r["maxrss_bytes"]),
                "-" if only else common.fmt_bytes(r["maxrss_bytes"] - base[lib]),
            ]
        )
    table = common.markdown_table(
        ["arm", "seconds", "peak RSS", "peak RSS above the import"], rows, "lrrr"
    )
    env = common.environment()
    lines = [
        "## Loading SmolLM2-135M (GGUF): pifi_jax vs transformers (CPU)",
        "",
        f"`python benchmarks/loading.py --repeats {repeats}`: each arm in a fresh child python, "
        f"alone; seconds the median of {repeats}, memory the largest peak resident set.",
        "",
        *common.environment_lines(env),
        "",
        table,
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to append, or -")
    args = parser.parse_args(argv)
    common.publish(report(measure(args.repeats), args.repeats), args.out)


if __name__ == "__main__":
    main()
