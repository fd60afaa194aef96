"""Numerics of more HuggingFace architectures than the test suite runs, on real gloo ranks.

    python benchmarks/check_hf_models.py                 # {"tp": 2} and {"dp": 2, "tp": 2}
    python benchmarks/check_hf_models.py bert,opt '{"tp": 2}'

For each model (tiny config, dropout 0, sdpa): the compiled model's output and every parameter's
gradient against the single-process model, relative to the reference tensor's scale (floor 1e-3),
plus runtime fix-ups and the plan's warnings. Uses the compute-bound test preset so plans shard.
"""

from __future__ import annotations

import copy
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
PRESET = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "compute_bound.json")
MODELS = ("bert", "opt", "qwen2", "mistral", "neox", "mixtral")


def build(name):
    import torch
    import transformers as T

    torch.manual_seed(0)
    common = dict(vocab_size=128, use_cache=False, attn_implementation="sdpa")
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if name == "bert":
        model = T.BertModel(T.BertConfig(intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         vocab_size=128, attn_implementation="sdpa", **{k: v for k, v in small.items()}))
    elif name == "opt":
        model = T.OPTForCausalLM(T.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, dropout=0.0, **small, **common))
    elif name == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, intermediate_size=128, **small, **common))
    elif name == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(num_key_value_heads=2, intermediate_size=128, **small, **common))
    elif name == "neox":
        model = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(intermediate_size=128, hidden_dropout=0.0, attention_dropout=0.0,
                                                      **small, **common))
    elif name == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(num_key_value_heads=2, intermediate_size=128, num_local_experts=4,
                                                     num_experts_per_tok=2, **small, **common))
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


def _check(rank, world, names, axes):
    import autopar
    from models import rel_err

    out = {}
    for name in names:
        model, inputs = build(name)
        ref = copy.deepcopy(model)
        pm = autopar.compile(model, autopar.Mesh(axes, hardware=PRESET), example_inputs=inputs)
        got, want = pm(*inputs), ref(*inputs)
        key = "logits" if getattr(want, "logits", None) is not None else "last_hidden_state"
        y, y_ref = getattr(got, key), getattr(want, key)
        y.float().pow(2).mean().backward()
        y_ref.float().pow(2).mean().backward()
        ref_params = dict(ref.named_parameters())
        grad = max(rel_err(p.grad.full_tensor(), ref_params[n].grad)
                   for n, p in pm.named_parameters() if ref_params[n].grad is not None)
        out[name] = {"out": rel_err(y, y_ref), "grad": grad,
                     "fixups": len(pm.runtime_fixups), "warnings": [w[:80] for w in pm.plan.warnings]}
    return out


def main():
    from dist_utils import run_ranks

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MODELS)
    meshes = [json.loads(sys.argv[2])] if len(sys.argv) > 2 else [{"tp": 2}, {"dp": 2, "tp": 2}]
    for axes in meshes:
        world = 1
        for n in axes.values():
            world *= n
        for name, r in run_ranks(_check, world, names, axes)[0].items():
            print(f"{json.dumps(axes):<20} {name:<8} out {r['out']:.1e}  grad {r['grad']:.1e}  fixups {r['fixups']}  "
                  f"warnings {r['warnings']}")


if __name__ == "__main__":
    main()
