"""The README's SmolLM2 commands, run from the README's own text (so the two cannot drift):
fetch, convert on TP1 x PP2, a PACED-RL run on GSM8K from ``examples/smollm2_gsm8k_cpu.yaml``,
export to Hugging Face, and generation with ``transformers``, reduced to one step of 2 x 2
samples. Checks that the run started from the real weights, that the export loads its
tokenizer in ``transformers`` and stops at its end token as the model it started from does."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_convert import SMOLLM2, smollm2_folder

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- tests/test_readme.py runs this block"
# What the test changes in the README's commands: a smaller run, and the export's check.
REDUCED = {"paced-train --config examples/smollm2_gsm8k_cpu.yaml":
           " --train-iters 1 --num-prompts-per-step 2 --num-samples-per-prompt 2 "
           "--max-new-tokens 12",
           "python tools/hf_generate.py": " --require-eos"}


def readme_commands() -> list[str]:
    """The bash block after :data:`MARK`, one command per entry (continuations joined)."""
    text = (REPO / "README.md").read_text()
    assert MARK in text, "README.md lost the tested SmolLM2 block"
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARK):], re.S).group(1)
    return [line.strip() for line in re.sub(r"\\\n\s*", "", block).splitlines() if line.strip()]


@pytest.mark.distributed
@pytest.mark.slow
def test_readme_smollm2_commands_run_as_written(tmp_path):
    commands = readme_commands()
    for start, extra in REDUCED.items():
        assert sum(c.startswith(start) for c in commands) == 1, (start, commands)
    commands = [c + next((e for s, e in REDUCED.items() if c.startswith(s)), "")
                for c in commands]
    # The commands run in a folder of their own, with the checkout's examples, tools and
    # environment; the fetched weights are the clone's cached copy (tests/test_convert.py).
    for name in ("examples", "tools", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / SMOLLM2).symlink_to(smollm2_folder())
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # Start-up noise a user cannot act on is filtered (upstream deprecations inside Megatron,
    # math-verify's timeout notice, Megatron's rerun-machine notice); no traceback anywhere.
    for noise in ("FutureWarning", "Timeout is disabled", "Rerun State Machine",
                  "RerunStateMachine", "Traceback", "OMP_NUM_THREADS"):
        assert noise not in output, (noise, output[-5000:])
    rows = [json.loads(line) for line in (tmp_path / "runs/smollm2/metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1] and rows[0]["num_samples"] == 4
    assert (tmp_path / "runs/smollm2/config.yaml").is_file()
    assert "stopped at the end token" in result.stdout, output[-3000:]
    # The run started from the converted weights (one Adam step of lr 1e-6 moves a weight by
    # about 1e-6), and the export generates what the model it started from generates.
    from megatron_paced.testing.hf_models import read_hf_tensors
    from tools.hf_generate import generate

    exported = tmp_path / "hf/smollm2-rl"
    original, trained = read_hf_tensors(smollm2_folder()), read_hf_tensors(exported)
    assert sorted(trained) == sorted(original)
    moved = max(float((trained[k] - original[k]).abs().max()) for k in original)
    assert 0 < moved < 1e-4, moved
    config = json.loads((exported / "config.json").read_text())
    assert config["eos_token_id"] == json.loads(
        (Path(smollm2_folder()) / "config.json").read_text())["eos_token_id"]
    prompt = "What is 12 + 30?"
    _, ids, eos = generate(str(exported), prompt, 64)
    _, original_ids, _ = generate(smollm2_folder(), prompt, 64)
    assert ids[-1] == eos and ids == original_ids


def test_readme_block_is_found_and_reduced():
    """The extraction itself (cheap): six commands, each reduction applies to one."""
    commands = readme_commands()
    assert commands[0] == "source .venv/bin/activate" and len(commands) == 6
    assert any("--pipeline-model-parallel-size 2" in c for c in commands)

