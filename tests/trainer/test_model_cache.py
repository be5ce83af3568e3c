"""The builtin model cache: concurrent first use is safe, a half-built entry is rebuilt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dpo_operator.local.kubelet import free_port
from dpo_trainer.io.builtin import MODEL_FORMAT, builtin_model_path
from transformers import AutoModelForCausalLM

BUILD = (
    "import sys; from pathlib import Path; from dpo_trainer.io.builtin import builtin_model_path; "
    "print(builtin_model_path('builtin:tiny-llama', Path(sys.argv[1])))"
)
# Rank 1 of a real gloo process group builds first: transformers writes model files on global
# rank 0 only once torch.distributed is initialized, which left entries without weights.
BUILD_FROM_RANK_ONE = """
import sys
from pathlib import Path
import torch.distributed as dist
from dpo_operator.local.kubelet import free_port
from dpo_trainer.io.builtin import builtin_model_path
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print(builtin_model_path("builtin:tiny-llama", Path(sys.argv[1])))
dist.barrier()
dist.destroy_process_group()
"""


ENTRY = f"tiny-llama-v{MODEL_FORMAT}"


def assert_complete(entry: Path) -> None:
    names = {p.name for p in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", ".complete"} <= names, names
    AutoModelForCausalLM.from_pretrained(entry)


def test_four_processes_building_into_an_empty_cache_at_once_all_get_one_whole_model(
    tmp_path: Path,
) -> None:
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    paths = {builder.communicate(timeout=300)[0].strip() for builder in builders}
    assert [b.returncode for b in builders] == [0, 0, 0, 0]
    assert paths == {str(tmp_path / ENTRY)}
    assert_complete(tmp_path / ENTRY)
    assert not list(tmp_path.glob(f".{ENTRY}.partial")), "no staging directory left behind"


def test_a_build_by_a_non_zero_rank_writes_the_weights(tmp_path: Path) -> None:
    script = tmp_path / "build.py"
    script.write_text(BUILD_FROM_RANK_ONE)
    cache = tmp_path / "cache"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "torchrun"),
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(script),
            str(cache),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_complete(cache / ENTRY)


def test_an_entry_left_half_built_by_a_crash_is_rebuilt_not_trusted(tmp_path: Path) -> None:
    entry = tmp_path / ENTRY
    entry.mkdir()
    (entry / "tokenizer.json").write_text("{}")  # what a crashed build left: no model at all
    staging = tmp_path / f".{ENTRY}.partial"  # the fill it was doing, cut off
    staging.mkdir()
    (staging / "tokenizer.json").write_text("{")
    assert builtin_model_path("builtin:tiny-llama", tmp_path) == entry
    assert_complete(entry)
    assert not staging.exists(), "the staging directory became the entry"
