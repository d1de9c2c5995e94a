"""README's Python example runs as written: its part that needs no pipeline output (the layer, a model, streaming,
padding, a causal LM), with the claims its comments make checked on the values it computed."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs_and_its_comments_hold():
    (block,) = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    # the rest loads stage 02's calibrated files (after `make repro`); make test does not make them
    standalone, rest = block.split("from bsbr.convert import", 1)
    assert "load_conversion" in rest
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(standalone, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    assert ns["y"].shape == (1, 4096, 512) and ns["hidden"].shape == (2, 1000, 512)
    attn, x = ns["attn"], ns["x"]
    with torch.no_grad():  # "torch.cat([out, more], 1) ≈ attn(x)": the two pieces continue one sequence
        first, _ = attn(x[:, :700], return_state=True)
        torch.testing.assert_close(torch.cat([first, ns["more"]], 1), attn(x), rtol=1e-5, atol=1e-5)
    state = ns["state"]
    assert state.num_tokens == 1000 and state.nbytes() == attn.state_nbytes(1000)  # "bytes held == the formula"
    assert ns["out"].shape == (2, 1000, 512) and torch.isfinite(ns["out"]).all()
    assert ns["tokens"].shape == (2, 120)  # 100 prompt tokens + 20 generated, greedy
