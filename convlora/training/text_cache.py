"""Frozen text encoders run once per caption instead of once per step (``--cache_text_embeddings``).

With frozen text encoders, a caption's prompt embedding is the same in every step it is drawn in,
so :class:`TextEmbeddingCache` computes it once for every caption the dataset can produce
(:meth:`convlora.training.data.TextImageDataset.possible_captions`: every caption of every item, and
the empty one under caption dropout) and the training loop looks each batch up instead of running
the encoders. The entries are keyed by the caption's token ids (of every encoder), which is all an
encoder sees, so a lookup can only ever return what the encoders would have computed for that row.

How exact: an encoder's output row depends on the other rows of its batch only through the shape
of the batch (the CPU/GPU kernels pick their blocking by size, not by values). The cache runs every
forward at the training batch size (a last, short batch of captions is padded with repeats), so a
cached embedding is bit-identical to encoding it in a training batch of that size -- measured: SD
and SDXL runs with and without the cache give identical losses and LoRA weights. A batch of another
size (the short last batch of an epoch) may differ in float32's last bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from convlora.training.data import DataError

__all__ = ["TextEmbeddingCache"]

Key = tuple[bytes, ...]


class TextEmbeddingCache:
    """Each caption's text-encoder outputs (a family's :meth:`~convlora.diffusion.families.Family.encode_prompts`),
    held on the CPU in the dtype the encoders produced them in."""

    def __init__(self, id_keys: Sequence[str], table: Mapping[Key, Mapping[str, torch.Tensor]]) -> None:
        """
        Args:
            id_keys: the batch keys of the token ids, one per text encoder (``input_ids``, ``input_ids_2``).
            table: token ids of a caption (bytes of each ``(L,)`` int64 row, in ``id_keys`` order) ->
                ``{"encoder_hidden_states": (L, D)[, "text_embeds": (P,)]}``.
        """
        self.id_keys = tuple(id_keys)
        self.table = dict(table)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        family: Any,
        text_encoders: Mapping[str, nn.Module],
        tokenize: Callable[[list[str]], Mapping[str, torch.Tensor]],
        captions: Sequence[str],
        device: torch.device,
        batch_size: int = 8,
    ) -> TextEmbeddingCache:
        """Run the encoders once over ``captions``, ``batch_size`` at a time.

        Args:
            family: the pipeline's :class:`~convlora.diffusion.families.Family`.
            tokenize: captions -> ``{id key: (N, L) token ids}`` (the dataset's own tokenizer function).
            device: where the encoders are.
        """
        id_keys = family.input_id_keys()
        table: dict[Key, dict[str, torch.Tensor]] = {}
        for start in range(0, len(captions), batch_size):
            chunk = list(captions[start : start + batch_size])
            chunk += chunk[-1:] * (batch_size - len(chunk))  # every forward of the same shape (see the module docstring)
            ids = {key: tensor.to(device) for key, tensor in tokenize(chunk).items()}
            encoded = family.encode_prompts(text_encoders, ids)
            for row in range(len(ids[id_keys[0]])):
                table[_row_key(ids, id_keys, row)] = {name: value[row].cpu() for name, value in encoded.items()}
        return cls(id_keys, table)

    def lookup(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The cached :meth:`~convlora.diffusion.families.Family.encode_prompts` output for a batch's
        token ids: ``{"encoder_hidden_states": (B, L, D)[, "text_embeds": (B, P)]}`` on ``device``.

        Raises:
            DataError: a row's caption was not cached (its token ids are not in the table).
        """
        ids = {key: batch[key].cpu() for key in self.id_keys}
        rows = []
        for row in range(len(ids[self.id_keys[0]])):
            entry = self.table.get(_row_key(ids, self.id_keys, row))
            if entry is None:
                raise DataError(f"batch row {row} (dataset index {int(batch['index'][row])}) has a caption that is not in the "
                                f"text-embedding cache of {len(self)} captions; the dataset produced a caption it did not list")
            rows.append(entry)
        return {name: torch.stack([entry[name] for entry in rows]).to(device) for name in rows[0]}

    def __len__(self) -> int:
        return len(self.table)

    @property
    def nbytes(self) -> int:
        """Bytes the cached tensors take."""
        return sum(t.numel() * t.element_size() for entry in self.table.values() for t in entry.values())


def _row_key(ids: Mapping[str, torch.Tensor], id_keys: Sequence[str], row: int) -> Key:
    return tuple(ids[key][row].to("cpu", torch.int64).numpy().tobytes() for key in id_keys)
