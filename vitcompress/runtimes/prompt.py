"""Prompt rewriting for a VLM whose visual tokens were reduced: each image / video has a run of
placeholder tokens in ``input_ids``, one per visual token the language model receives; once a
method changed the token counts, the runs are shortened (or lengthened) to match, and the mask,
labels and positions follow."""
from typing import Any, Dict, List, Optional, Tuple

import torch

Tensor = torch.Tensor


def unit_rows(input_ids: Tensor, token_id: int, counts: List[int], modality: str) -> List[int]:
    """The batch row each image / video belongs to, from its placeholder count (in order)."""
    per_row = (input_ids == token_id).sum(dim=1).tolist()
    rows, unit = [], 0
    for b, n in enumerate(per_row):
        while n > 0 and unit < len(counts):
            if counts[unit] > n:
                break
            n -= counts[unit]
            rows.append(b)
            unit += 1
        if n != 0:
            break
    if unit != len(counts) or sum(per_row) != sum(counts):
        raise ValueError(f"{modality} placeholders in input_ids ({per_row} per sample) do not match the "
                         f"{len(counts)} {modality}(s) given ({counts} tokens each): each {modality} needs its "
                         "full run of placeholders in one sample, as the model's processor writes them")
    return rows


def rewrite_prompt(input_ids: Tensor, attention_mask: Optional[Tensor], labels: Optional[Tensor],
                   position_ids: Optional[Tensor], counts: Dict[int, Tuple[str, List[int], List[int]]],
                   pad_id: int) -> Dict[str, Any]:
    """Replace each unit's run of placeholders by as many as it now has tokens; pad the rows back
    to one length and rebuild the mask, labels and (when needed) the position ids.

    ``counts``: placeholder token id -> (modality, tokens per unit before, after). Rows that became
    shorter are padded on the side the batch was padded on (left otherwise); ``position_ids`` are
    recomputed from the new mask when the caller gave them or padding was added.
    """
    B = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    rows = [[input_ids[b], mask[b], labels[b] if labels is not None else None] for b in range(B)]
    for token_id, (modality, old, new) in counts.items():
        row_of = unit_rows(torch.nn.utils.rnn.pad_sequence([r[0] for r in rows], batch_first=True,
                                                           padding_value=-1),
                           token_id, old, modality)
        for b in range(B):
            units = [u for u, r in enumerate(row_of) if r == b]
            if not units:
                continue
            pos = (rows[b][0] == token_id).nonzero().flatten()
            repeat = torch.ones_like(rows[b][0])
            start = 0
            for u in units:
                repeat[pos[start:start + old[u]]] = 0
                repeat[pos[start]] = new[u]
                start += old[u]
            rows[b] = [t.repeat_interleave(repeat) if t is not None else None for t in rows[b]]
    lengths = [r[0].shape[0] for r in rows]
    longest = max(lengths)
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any())

    def pad(t, value):
        fill = t.new_full((longest - t.shape[0],), value)
        return torch.cat([t, fill] if right else [fill, t])

    out = {"input_ids": torch.stack([pad(r[0], pad_id) for r in rows])}
    padded = any(n != longest for n in lengths)
    new_mask = torch.stack([pad(r[1], 0) for r in rows])
    if attention_mask is not None or padded:
        out["attention_mask"] = new_mask
    if labels is not None:
        out["labels"] = torch.stack([pad(r[2], -100) for r in rows])
    if position_ids is not None or padded:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp_min(0)
    return out
