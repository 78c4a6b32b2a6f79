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
                   pad_id: int, sources: Optional[Dict[int, List[Tensor]]] = None,
                   columns: Optional[Dict[str, Tuple[Tensor, int]]] = None) -> Dict[str, Any]:
    """Replace each unit's run of placeholders by as many as it now has tokens; pad the rows back
    to one length and rebuild the mask, labels and (when needed) the position ids.

    ``counts``: placeholder token id -> (modality, tokens per unit before, after). Rows that became
    shorter are padded on the side the batch was padded on (left otherwise); ``position_ids`` are
    recomputed from the new mask when the caller gave them or padding was added.

    Without ``sources`` a unit's new tokens take the place of its run. ``sources`` (models whose
    positions say where each token was, such as M-RoPE): placeholder token id -> per unit, the index
    into the unit's run of the token each new token stands for; each new token then takes the place
    of that token (a run split by text, as a video's frames, stays split), and ``columns`` -- further
    tensors ``[..., B, L]`` of the original prompt by name, with their padding value -- are returned
    taken at those columns (e.g. the full prompt's 3-D ``position_ids``: a kept token keeps its
    position, the text keeps its own).
    """
    B = input_ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    replaced = torch.zeros_like(input_ids, dtype=torch.bool)
    new_tokens: List[List[Tuple[Tensor, Tensor]]] = [[] for _ in range(B)]  # per row: (place, source) columns
    for token_id, (modality, old, new) in counts.items():
        row_of = unit_rows(input_ids, token_id, old, modality)
        start_of = [0] * B
        for u, b in enumerate(row_of):
            run = (input_ids[b] == token_id).nonzero().flatten()[start_of[b]:start_of[b] + old[u]]
            start_of[b] += old[u]
            replaced[b, run] = True
            if sources is None:
                source = run.new_zeros(new[u])
            else:
                source = sources[token_id][u].to(run.device)
                if source.shape != (new[u],) or (new[u] and not 0 <= int(source.min()) <= int(source.max()) < old[u]):
                    raise ValueError(f"{modality} {u}: {tuple(source.shape)} token sources for {new[u]} tokens "
                                     f"of a run of {old[u]}")
            # in the order of the unit's tokens: each at its source's place or after the one before it
            place = source.cummax(0).values if new[u] else source
            new_tokens[b].append((run[place], run[source]))
    order = []  # per row: the original columns of the rewritten row's tokens, and of their sources
    for b in range(B):
        kept = (~replaced[b]).nonzero().flatten()
        place = torch.cat([kept] + [p for p, _ in new_tokens[b]])
        source = torch.cat([kept] + [s for _, s in new_tokens[b]])
        sort = torch.sort(place, stable=True).indices
        order.append((place[sort], source[sort]))
    rows = [[input_ids[b][p], mask[b][p], labels[b][p] if labels is not None else None]
            for b, (p, _) in enumerate(order)]
    lengths = [r[0].shape[0] for r in rows]
    longest = max(lengths)
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any())

    def pad(t, value):
        fill = t.new_full(t.shape[:-1] + (longest - t.shape[-1],), value)
        return torch.cat([t, fill] if right else [fill, t], dim=-1)

    out = {"input_ids": torch.stack([pad(r[0], pad_id) for r in rows])}
    padded = any(n != longest for n in lengths)
    new_mask = torch.stack([pad(r[1], 0) for r in rows])
    if attention_mask is not None or padded:
        out["attention_mask"] = new_mask
    if labels is not None:
        out["labels"] = torch.stack([pad(r[2], -100) for r in rows])
    if position_ids is not None or padded:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).clamp_min(0)
    for name, (tensor, value) in (columns or {}).items():
        out[name] = torch.stack([pad(tensor[..., b, s], value) for b, (_, s) in enumerate(order)], dim=-2)
    return out
