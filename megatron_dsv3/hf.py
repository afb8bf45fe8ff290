"""HF DeepSeek-V3 checkpoints in and out, and the logits API (public).

    model = megatron_dsv3.hf.load(hf_dir, dtype=torch.float32)
    logits = megatron_dsv3.hf.logits(model, input_ids)          # [b, s, vocab]
    mtp = megatron_dsv3.hf.mtp_logits(model, input_ids)         # [[b, s-k, vocab] for k in 1..D]
    megatron_dsv3.hf.save(model, out_dir)

The key table, reader and writer live in :mod:`megatron_dsv3.checkpoint`. Each rank reads only the
tensors (and experts) it holds, one at a time, so host memory stays at one tensor plus this rank's
shard of the model. Expected keys, shapes and key counts are checked; an error names the tensor.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .checkpoint.hf_keys import (  # noqa: F401  (public names)
    GLOBAL_KEYS,
    LAYER_KEYS,
    MTP_SHARED_COPIES,
    HFCheckpointError,
    Key,
    Layout,
    all_entries,
    expected_hf_keys,
)
from .checkpoint.hf_reader import HFCheckpoint, dequantize_fp8, load_into  # noqa: F401
from .checkpoint.hf_writer import save, to_hf_state_dict  # noqa: F401
from .config import DSv3Config, cpu_overrides
from .config.hf_config import hf_to_config_kwargs, read_hf_config
from .parallel.world import ensure_world

log = logging.getLogger(__name__)


def config_for(hf_dir: str, dtype=torch.float32, **overrides) -> DSv3Config:
    """DSv3Config for a HF checkpoint on the current parallel state."""
    from megatron.core import parallel_state as ps

    from .compat import cpu_backend

    tp = ps.get_tensor_model_parallel_world_size()
    kw = dict(
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if cpu_backend.is_enabled():
        kw.update({k: v for k, v in cpu_overrides().items() if k not in ("params_dtype", "bf16")})
    # config.json carries no gamma / lambda (V2 / V3 releases carry alpha as aux_loss_alpha): for a loaded
    # checkpoint use the paper's for what is missing, said aloud.
    carried = hf_to_config_kwargs(read_hf_config(hf_dir))
    training = dict(seq_aux_alpha=0.0001, bias_update_rate=0.001, mtp_lambda=0.3)
    defaulted = {k: v for k, v in training.items() if k not in overrides and k not in carried}
    if defaulted:
        log.info("HF config.json has no %s; using the DeepSeek-V3 paper's %s (pass them to hf.load to "
                 "change)", sorted(defaulted), defaulted)
    kw.update(defaulted)
    kw.update(overrides)
    return DSv3Config.from_hf_config(hf_dir, **kw)


def load(hf_dir: str, dtype=torch.float32, **config_overrides):
    """Build our DSv3 GPTModel for ``hf_dir`` and load its weights (this rank's shard)."""
    from .model.spec import build_model

    ensure_world()
    cfg = config_for(hf_dir, dtype, **config_overrides)
    model = build_model(cfg)
    load_into(model, hf_dir)
    model.eval()
    return model


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)


def _check_sequence(model, input_ids: torch.Tensor) -> None:
    cfg = model.config
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if cfg.sequence_parallel and input_ids.shape[1] % cfg.tensor_model_parallel_size:
        raise ValueError(f"sequence length {input_ids.shape[1]} must be divisible by the tensor-parallel "
                         f"size {cfg.tensor_model_parallel_size} (sequence parallelism)")
    if input_ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings}")


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for the block, then the model's previous mode (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Float logits [batch, seq, vocab] of the main model for positions 0..seq-1."""
    _check_sequence(model, input_ids)
    with _eval_mode(model):
        out = model(input_ids, _positions(input_ids), None)      # [b, s, vocab / TP]
    return _gather_vocab(out).float()


@torch.no_grad()
def mtp_logits(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """One tensor per MTP depth k: [batch, seq-k, vocab], entry i predicting token i+k+1."""
    if not model.config.mtp_num_layers:
        return []
    _check_sequence(model, input_ids)
    pos = _positions(input_ids)
    seq, depth = input_ids.shape[1], model.config.mtp_num_layers
    with _eval_mode(model):
        emb = model.embedding(input_ids=input_ids, position_ids=pos)
        hidden = model.decoder(hidden_states=emb, attention_mask=None)
        hidden = model.mtp(input_ids=input_ids, position_ids=pos, hidden_states=hidden,
                           attention_mask=None, embedding=model.embedding)
        chunks = torch.chunk(hidden, 1 + depth, dim=0)      # [main, depth 1, ..., depth D]
        out = []
        for k in range(1, 1 + depth):
            lg, _ = model.output_layer(chunks[k])               # [s, b, vocab / TP]
            out.append(_gather_vocab(lg).transpose(0, 1)[:, : seq - k].float())
    return out
