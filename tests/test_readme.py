"""The README's quick-start code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md quick start", "exec"), namespace)
    assert (tmp_path / "adapter.safetensors").is_file()
    assert not namespace["convlora"].lora_layers(namespace["fresh"]), "merge_and_unload leaves plain layers"
