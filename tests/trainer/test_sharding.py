"""The pieces of sharded loading and export that need no process group: reading a row range of
a safetensors tensor (and nothing else), checkpoint names of wrapped parameters, and how the
export spreads tensors over the ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dpo_contract.pod import BadInputError
from dpo_trainer.train.sharding import Checkpoint, checkpoint_key, export_owners
from safetensors.torch import save_file


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_file(
        {
            "embed.weight": torch.randn(10, 6),
            "norm.weight": torch.randn(6).to(torch.bfloat16),
            "scalar": torch.tensor(3.0),
        },
        str(tmp_path / "model.safetensors"),
    )
    return tmp_path


def test_a_row_range_reads_exactly_those_rows_in_the_stored_dtype(checkpoint: Path) -> None:
    from safetensors.torch import load_file

    whole = load_file(str(checkpoint / "model.safetensors"))
    with Checkpoint(checkpoint) as reader:
        assert torch.equal(reader.read("embed.weight", slice(3, 7)), whole["embed.weight"][3:7])
        assert torch.equal(reader.read("embed.weight", slice(9, 9)), whole["embed.weight"][9:9])
        assert torch.equal(reader.read("norm.weight", slice(2, 4)), whole["norm.weight"][2:4])
        assert reader.read("norm.weight", None).dtype == torch.bfloat16
        assert torch.equal(reader.read("scalar", None), whole["scalar"])
        assert "lm_head.weight" not in reader


def test_a_checkpoint_without_safetensors_says_how_to_make_one(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(BadInputError, match="save_pretrained\\(safe_serialization=True\\)"):
        Checkpoint(tmp_path)


def test_a_cut_short_file_is_named(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with Checkpoint(checkpoint) as reader, pytest.raises(BadInputError, match="cut short"):
        reader.read("embed.weight", slice(0, 10))


def test_wrapped_parameters_are_found_under_their_checkpoint_names() -> None:
    assert (
        checkpoint_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        == "model.layers.0.self_attn.q_proj.weight"
    )
    assert checkpoint_key("model.norm.weight") == "model.norm.weight"


def test_every_rank_writes_about_an_equal_part_of_the_model() -> None:
    sizes = {f"layer{i}": 100 for i in range(30)} | {"embed": 400, "head": 400}
    owners = export_owners(sizes, 4)
    written = [sum(sizes[k] for k, r in owners.items() if r == rank) for rank in range(4)]
    print(f"elements written per rank: {written}")
    assert max(written) <= 1.1 * sum(sizes.values()) / 4
    assert owners == export_owners(dict(reversed(sizes.items())), 4), "the same on every rank"
