"""Small models used by the tests: hand-written and HuggingFace, all deterministic from a seed."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d=32, hidden=64, out=16):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """A GPT block. ``fused_qkv`` projects q, k and v with one matmul (GPT-2 style)."""

    def __init__(self, d, heads, fused_qkv=True):
        super().__init__()
        self.heads = heads
        self.fused_qkv = fused_qkv
        self.ln1 = nn.LayerNorm(d)
        if fused_qkv:
            self.qkv = nn.Linear(d, 3 * d, bias=False)
        else:
            self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).split(d, dim=-1) if self.fused_qkv else (self.q(h), self.k(h), self.v(h))
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A hand-written GPT: causal sdpa attention, layernorm, GELU MLP, tied embeddings."""

    def __init__(self, vocab=128, d=64, heads=4, layers=2, max_len=64):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def hf_gpt2(layers=2, d=64, heads=4, vocab=128):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa", use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def hf_llama(layers=2, d=64, heads=4, kv_heads=2, vocab=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=64,
                      attn_implementation="sdpa", use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def hf_mixtral(layers=2, d=32, experts=8, vocab=128, impl=None):
    """Mixtral with top-2 of ``experts``; ``impl`` picks transformers' expert kernel (default grouped_mm)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=48, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, vocab_size=vocab,
                        max_position_embeddings=64, attn_implementation="sdpa", use_cache=False,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, experts_implementation=impl)
    return MixtralForCausalLM(cfg)


def hf_qwen_moe(layers=2, d=32, experts=4, vocab=128):
    """Qwen2-MoE: top-2 of ``experts`` plus a gated shared expert, unnormalised top-k weights."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                         num_experts=experts, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                         vocab_size=vocab, max_position_embeddings=64, attn_implementation="sdpa", use_cache=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen2MoeForCausalLM(cfg)


def build(name: str, seed: int = 0):
    """(model, example_inputs) for a named test model, identical on every rank."""
    torch.manual_seed(seed)
    if name == "mlp":
        return MLP(), (torch.randn(8, 32),)
    if name == "convnet":
        return ConvNet(), (torch.randn(4, 3, 8, 8),)
    if name == "custom":
        ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(seed + 1))
        mask = torch.ones(4, 12, dtype=torch.bool)
        mask[:, 8:] = False
        return Custom(), (ids, mask)
    model = {"gpt": GPT, "hf_gpt2": hf_gpt2, "hf_llama": hf_llama, "hf_mixtral": hf_mixtral,
             "hf_mixtral_bmm": lambda: hf_mixtral(impl="batched_mm"), "hf_qwen_moe": hf_qwen_moe}[name]()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(seed + 1))
    return model, (ids,)


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def saved_activation_bytes(pm, inputs) -> int:
    """Bytes of the distinct storages autograd saves in one forward of ``pm``, parameters excluded
    (the CPU stand-in for torch.cuda.max_memory_allocated)."""
    from torch.distributed.tensor import DTensor

    from autopar.codegen import runtime

    params = {p.to_local().untyped_storage().data_ptr() for p in pm.parameters()}
    saved: dict[int, int] = {}
    executor_pack = runtime.Executor._pack

    def pack(self, t):  # what the executor's own hook keeps (a gathered value may be kept as its shard)
        kept = executor_pack(self, t)
        x = kept[1] if isinstance(kept, tuple) else kept
        storage = (x.to_local() if isinstance(x, DTensor) else x).untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return kept

    runtime.Executor._pack = pack
    try:
        logits(pm(*inputs))
    finally:
        runtime.Executor._pack = executor_pack
    return sum(saved.values())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Error relative to the reference tensor's scale, with a floor for near-zero tensors
    (gradients that are mathematically zero are rounding noise; see FACTS.md)."""
    return float((a.float() - b.float()).abs().max() / max(float(b.float().abs().max()), 1e-3))


class ConvNet(nn.Module):
    """A small CNN with BatchNorm (running statistics are buffers the forward pass updates)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean((2, 3)))


class Custom(nn.Module):
    """A user-written module: hand-rolled masked attention, a scale parameter, concat, log-softmax,
    and a boolean mask input."""

    def __init__(self, vocab=50, d=24, out=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)  # a key bias has a mathematically zero gradient
        self.o = nn.Linear(2 * d, out)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, ids, mask):
        x = self.emb(ids) * self.scale
        a = (self.q(x) @ self.k(x).transpose(-1, -2)) / x.shape[-1] ** 0.5
        a = a.masked_fill(~mask[:, None, :], -1e9).softmax(-1)
        y = torch.cat([a @ self.v(x), x.relu()], dim=-1)
        return self.o(y).log_softmax(-1)[:, 1:].sum(1)
