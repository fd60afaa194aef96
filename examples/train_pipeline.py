"""Train a small HF Llama through a 3-D mesh, pipeline x data x tensor (pp=2 x dp=2 x tp=2), on 8 CPU ranks.

    autopar run examples/train_pipeline.py --nproc 8                # 4 layers, hidden 64, 5 AdamW steps
    autopar run examples/train_pipeline.py --nproc 8 -- --small     # 2 layers, hidden 32, 2 steps (the test)

autopar splits the decoder layers into pipeline stages, lays each stage out over dp x tp, and
runs the plan's schedule (gpipe, 1f1b, interleaved-1f1b or zb-h1, with the microbatch count it
chose): ``pm.train_step`` is the training loop's forward + backward, and leaves every rank its own
stage's gradients. The pins lay each stage out Megatron-style on ``tp`` and split the batch over
``dp`` (the solver alone keeps a model this small replicated; ``--auto`` shows its plan). Every
step is checked against the same model trained in one process; the script prints the largest
differences and exits with status 1 if one is over the tolerance.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import autopar
import common  # examples/common.py: the harness every training example shares

LAYOUT = {
    "embedding": {"dp": "S(0)"},  # the token embedding's output: each dp rank takes half of each microbatch
    "model.layers.*.self_attn.[qkv]_proj.weight": {"tp": "S(0)"},
    "model.layers.*.self_attn.o_proj.weight": {"tp": "S(1)"},
    "model.layers.*.mlp.gate_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.up_proj.weight": {"tp": "S(0)"},
    "model.layers.*.mlp.down_proj.weight": {"tp": "S(1)"},
}


def next_token_loss(out, ids):
    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def main() -> int:
    args = common.parse(common.arg_parser(__doc__, mesh="pp=2,dp=2,tp=2"))
    layers, hidden, vocab, (batch, seq) = (2, 32, 64, (8, 8)) if args.small else (4, 64, 256, (16, 32))

    rank = common.start()
    mesh = autopar.Mesh.parse(args.mesh)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    ids = common.token_ids(vocab, batch, seq)
    ref = copy.deepcopy(model)  # the same model, trained in this one process
    pm = autopar.compile(model, mesh, example_inputs=(ids,), pins=common.pins(LAYOUT, mesh, args.auto))
    if rank == 0:
        pipe = pm.plan.pipeline
        print(pm.plan.summary())
        print(f"{len(pipe['bounds'])} stages {pipe['bounds']}, schedule {pipe['schedule']}, "
              f"{pipe['microbatches']} microbatches")
    # the compiled model's forward + backward is pm.train_step (its loss: the mean over the microbatches);
    # every rank is left its own stage's gradients, and compares its own stage's parameters
    return common.train_and_compare(pm, ref, lambda m: next_token_loss(m(ids), ids), args.steps,
                                    train_step=lambda: pm.train_step(ids, target=ids, loss_fn=next_token_loss))


if __name__ == "__main__":
    raise SystemExit(main())
