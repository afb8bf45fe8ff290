"""``dsv3-pretrain --hf-checkpoint DIR``: start training from HF DeepSeek-V3 weights, no conversion.

At launch (no process group yet) :func:`check_hf_checkpoint` refuses a directory whose config.json
describes another model than the one launched (each differing field named with its flag), whose
vocabulary differs from the model's padded one, or whose tensors are not exactly the ones that model
needs (names from the safetensors headers: nothing is read). When the model is built, every rank
reads only its own shards, one tensor at a time (:func:`init_from_hf`, the reader ``hf.load`` uses);
shapes are checked there, naming the tensor.
"""
from __future__ import annotations

from .hf_keys import IGNORED_HF_KEYS, HFCheckpointError, expected_hf_keys

#: DSv3 fields that shape the weights or what they compute: config.json must agree with the launch
WEIGHT_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "first_k_dense_replace",
                 "moe_layer_interval", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                 "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "scoring_func",
                 "norm_topk_prob", "rms_norm_eps", "mtp_num_layers")
#: may differ on purpose (context extension: another RoPE on the same weights): said, not refused
ROPE_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")


def _flag(field: str) -> str:
    from ..config.mapping import ROWS, flag_name

    for row in ROWS:
        if row.field == field and row.flag:
            return flag_name(row.flag)
    return {"moe_layer_interval": "--moe-layer-freq", "n_routed_experts": "--num-experts"}.get(field, field)


def _norm(field: str, value):
    if field == "mtp_num_layers":
        return value or None
    if field == "moe_layer_interval":
        return value or 1
    if isinstance(value, float):
        return float(value)
    return value


def check_hf_checkpoint(hf_dir: str, fields: dict, model_vocab: int, tp: int, divisible_by: int) -> list[str]:
    """Refuse (HFCheckpointError) a HF directory whose config or tensors do not match the launched
    model; returns notes for the console (RoPE settings that differ, applied to these weights)."""
    import os

    from ..config import DSv3ConfigError
    from ..config.hf_config import hf_to_config_kwargs, read_hf_config
    from .convert import natural, plan_config
    from .safetensors_io import HFDir

    if not os.path.isdir(hf_dir):
        raise HFCheckpointError("not a directory")
    try:
        hf = read_hf_config(hf_dir)
        ckpt = hf_to_config_kwargs(hf)
    except (OSError, DSv3ConfigError) as e:
        raise HFCheckpointError(str(e)) from None
    wrong = []
    for field in WEIGHT_FIELDS:
        if field in ("ffn_hidden_size",) and fields.get("first_k_dense_replace") == 0:
            continue
        a, b = _norm(field, fields.get(field)), _norm(field, ckpt.get(field))
        if a != b:
            wrong.append(f"{field} {a!r} (launch: {_flag(field)} or the preset) vs {b!r} in config.json")
    if wrong:
        raise HFCheckpointError("config.json describes another model than the one launched, so its weights do not "
                                "fit: " + "; ".join(wrong) + ". Launch with --dsv3-hf-config "
                                f"{hf_dir} (the checkpoint's own model) or fix the flags")
    if model_vocab != ckpt["vocab_size"]:
        raise HFCheckpointError(
            f"the embedding has {ckpt['vocab_size']} rows but the launched model's vocabulary is {model_vocab} "
            f"(the tokenizer's, padded to a multiple of --make-vocab-size-divisible-by {divisible_by} x TP {tp}); "
            "choose the tokenizer / --make-vocab-size-divisible-by so that they agree")
    notes = [f"{f}: {fields.get(f)!r} for this run, {ckpt.get(f)!r} in config.json (the weights do not depend on "
             "it; the run's value is used)" for f in ROPE_FIELDS if fields.get(f) != ckpt.get(f)]
    cfg = plan_config(hf)
    src = HFDir(hf_dir)
    present = {k for k in src.entries if not k.endswith("weight_scale_inv") and not IGNORED_HF_KEYS.match(k)}
    expected = expected_hf_keys(cfg)
    missing, unexpected = sorted(expected - present, key=natural), sorted(present - expected, key=natural)
    if missing:
        raise HFCheckpointError(f"{len(missing)} tensor(s) the model needs are missing, first: {missing[0]!r}")
    if unexpected:
        raise HFCheckpointError(f"{len(unexpected)} tensor(s) the model does not have, first: {unexpected[0]!r}")
    return notes


def init_from_hf(chunks, hf_dir: str) -> None:
    """Copy this rank's shards of the HF weights into each model chunk (shapes checked, named)."""
    from .hf_reader import load_into

    for chunk in chunks:
        load_into(chunk, hf_dir)
