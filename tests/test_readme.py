"""The README's examples run as written: every python block, then every `convlora ...` line."""

import re
import shlex
from pathlib import Path


from convlora.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
CLI_LINES = [
    line.split("#")[0].strip()
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
    for line in block.splitlines()
    if line.startswith("convlora ")
]


def test_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(PYTHON_BLOCKS[0], "README.md quick start", "exec"), namespace)
    assert (tmp_path / "adapter.safetensors").is_file()
    assert not namespace["convlora"].lora_layers(namespace["fresh"]), "merge_and_unload leaves plain layers"


def test_several_adapters_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    example = next(b for b in PYTHON_BLOCKS if "set_adapters" in b)
    exec(compile(example, "README.md several adapters", "exec"), namespace)
    convlora = namespace["convlora"]
    assert convlora.list_adapters(namespace["model"]) == ["subject", "extra"]
    assert convlora.list_adapters(namespace["other"]) == ["style", "subject"]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["style.safetensors", "subject.safetensors"]
    trainable = {n for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_adapters.extra.lora_A", "0.lora_adapters.extra.lora_B"}


def test_diffusion_example_and_cli_lines_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    example = next(b for b in PYTHON_BLOCKS if "save_pipeline_lora" in b)
    exec(compile(example, "README.md diffusion example", "exec"), namespace)
    info = namespace["info"]
    assert info["format"] == "kohya" and len(info["unet"]) == 117 and len(info["text_encoder"]) == 20
    assert len(CLI_LINES) >= 6
    for line in CLI_LINES:
        assert main(shlex.split(line)[1:]) == 0, line
