"""Hand-built stand-ins for vLLM's and vLLM-Ascend's Qwen2 / Llama module trees (vLLM cannot run on
these CPU machines).

Reproduced from the sources (vllm/model_executor/layers/layernorm.py, linear.py, activation.py,
models/qwen2.py, llama.py; vllm_ascend/ops/layernorm.py): class names; ``CustomOp`` dispatching
``forward(*args, **kwargs)`` to ``forward_native`` / ``forward_cuda`` / ``forward_oot``; ``RMSNorm(x,
residual)`` returning ``(x, residual)``, whose CUDA path (``ops.fused_add_rms_norm``) overwrites ``x``
with the normed output and ``residual`` with ``x + residual`` in place; ``GemmaRMSNorm`` (1 + w);
``AscendRMSNorm`` returning new ``(y, x + residual)`` as ``torch_npu.npu_add_rms_norm`` does; the
parallel linears returning ``(output, bias)``; ``SiluAndMul``; decoder layers
``forward(positions, hidden_states, residual)`` returning ``(mlp output, residual)``; the model's
forward on flattened ``input_ids`` / ``positions`` ``[num_tokens]`` returning hidden states, logits
computed outside it by ``LogitsProcessor``; the attention core reading the sequence boundaries from a
forward context the runner sets (vLLM's ``set_forward_context``), not from its arguments.

What a stand-in cannot prove: the kernels themselves (CUDA ``fused_add_rms_norm``, ``npu_add_rms_norm``,
paged attention) are emulated in torch; the real engine's scheduling, CUDA/ACL graphs, torch.compile
and tensor parallelism are absent.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_CONTEXT: dict = {}


@contextlib.contextmanager
def set_forward_context(tokens_per_sequence: int):
    """What the model runner gives the attention layers (vLLM: attn_metadata via set_forward_context):
    here, the batch is sequences of ``tokens_per_sequence`` tokens one after another."""
    _CONTEXT["tokens"] = tokens_per_sequence
    try:
        yield
    finally:
        _CONTEXT.clear()


# ------------------------------------------------------------------------------------------------
class CustomOp(nn.Module):
    """vLLM's CustomOp: forward(*args, **kwargs) dispatches to the platform's implementation."""

    path = "native"  # "native", "cuda" (in-place fused kernels, emulated) or "oot" (vLLM-Ascend)

    def forward(self, *args, **kwargs):
        return getattr(self, f"forward_{self.path}", self.forward_native)(*args, **kwargs)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size, self.variance_epsilon = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        orig_dtype = x.dtype
        x = x.to(torch.float32)
        if residual is not None:
            x = x + residual.to(torch.float32)
            residual = x.to(orig_dtype)
        x = _rms(x, self.variance_epsilon).to(orig_dtype) * self.weight
        return x if residual is None else (x, residual)

    def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return (
                _rms(x.float(), self.variance_epsilon).to(x.dtype) * self.weight
            )  # ops.rms_norm: a new tensor
        # ops.fused_add_rms_norm(x, residual, weight, eps): residual <- x + residual, x <- norm(residual) * w
        residual.add_(x)
        x.copy_(_rms(residual.float(), self.variance_epsilon).to(x.dtype) * self.weight)
        return x, residual

    forward_xpu = (
        forward_cuda  # ipex_ops.fused_add_rms_norm: the same in-place contract on Intel XPU
    )


class GemmaRMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        orig_dtype = x.dtype
        if residual is not None:
            x = x.float() + residual.float() if orig_dtype == torch.float16 else x + residual
            residual = x
        x = _rms(x.float(), self.variance_epsilon) * (1.0 + self.weight.float())
        x = x.to(orig_dtype)
        return x if residual is None else (x, residual)

    def forward_xpu(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """A platform whose fused Gemma kernel overwrites its arguments (vLLM 0.34 on Intel XPU): the class
        is the same, whether it writes in place is decided at run time."""
        if residual is None:
            return self.forward_native(x)
        residual.add_(x)
        x.copy_(
            (_rms(residual.float(), self.variance_epsilon) * (1.0 + self.weight.float())).to(
                x.dtype
            )
        )
        return x, residual


class AscendRMSNorm(RMSNorm):
    """vLLM-Ascend's class: forward_oot calls torch_npu.npu_add_rms_norm(x, residual, w, eps), which
    returns new tensors (y, rstd, x + residual), and returns (y, x + residual). A quantised checkpoint
    (anti-outlier method m4) gives it a ``bias``, added in place to the new y (``x.add_(self.bias)``)."""

    path = "oot"

    def __init__(self, hidden_size: int, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__(hidden_size, eps)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False) if bias else None

    def forward_oot(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            total = x + residual
            y = _rms(total.float(), self.variance_epsilon).to(x.dtype) * self.weight
            if self.bias is not None:
                y.add_(self.bias)
            return y, total
        y = _rms(x.float(), self.variance_epsilon).to(x.dtype) * self.weight
        if self.bias is not None:
            y.add_(self.bias)
        return y


class ResidualFirstRMSNorm(RMSNorm):
    """A fused add+norm that returns its tuple the other way round: (residual, normed)."""

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        output = super().forward_native(x, residual)
        return output if residual is None else (output[1], output[0])


# ------------------------------------------------------------------------------------------------
class LinearBase(nn.Module):
    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, skip_bias_add: bool = False
    ) -> None:
        super().__init__()
        self.input_size, self.output_size, self.skip_bias_add = (
            input_size,
            output_size,
            skip_bias_add,
        )
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None

    def forward(self, input_: torch.Tensor):
        bias = self.bias if not self.skip_bias_add else None
        output = F.linear(input_, self.weight, bias)
        return output, (self.bias if self.skip_bias_add else None)


class ColumnParallelLinear(LinearBase):
    pass


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
    ) -> None:
        super().__init__(hidden_size, (total_num_heads + 2 * total_num_kv_heads) * head_size, bias)


class RowParallelLinear(LinearBase):
    pass


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_, self.weight)


class AscendVocabParallelEmbedding(VocabParallelEmbedding):
    """vLLM-Ascend's embedding (vllm_ascend/ops/vocab_parallel_embedding.py): a subclass with its own
    forward (tensor-parallel variants around the same lookup)."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> "ParallelLMHead":
        """vLLM's unquantised tie: the head shares the embedding's weight and stays a module of its own."""
        self.weight = embed_tokens.weight
        return self

    def forward(self, input_):
        raise RuntimeError("LMHead's weights should be used in the sampler.")


class LogitsProcessor(nn.Module):
    def forward(self, lm_head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, lm_head.weight)


class SiluAndMul(CustomOp):
    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class AscendSiluAndMul(SiluAndMul):
    """vLLM-Ascend: forward_oot calls torch_npu.npu_swiglu(x) = silu(x[..., :d]) · x[..., d:]."""

    path = "oot"

    def forward_oot(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class AscendSiluAndMul310(AscendSiluAndMul):
    """vLLM-Ascend on 310P (vllm_ascend/_310p/ops/activation.py): overrides forward itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return F.silu(x[..., :h]) * x[..., h:]


class RotaryEmbedding(CustomOp):
    """Neox-style rotary embedding on flattened tokens: forward(positions, query, key) -> (query, key)."""

    def __init__(self, head_size: int, base: float) -> None:
        super().__init__()
        self.head_size = head_size
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(query.dtype)[:, None, :], emb.sin().to(query.dtype)[:, None, :]

        def rotate(x: torch.Tensor) -> torch.Tensor:
            shaped = x.view(x.shape[0], -1, self.head_size)
            half = self.head_size // 2
            rotated = torch.cat((-shaped[..., half:], shaped[..., :half]), dim=-1)
            return (shaped * cos + rotated * sin).reshape(x.shape)

        return rotate(query), rotate(key)

    def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """ops.rotary_embedding is an in-place operation that updates the query and key tensors."""
        rotated_query, rotated_key = self.forward_native(positions, query, key)
        query.copy_(rotated_query)
        key.copy_(rotated_key)
        return query, key


class Attention(nn.Module):
    """The attention core: forward(query, key, value) on flattened tokens; the sequences come from the
    forward context, as vLLM's backends read attn_metadata."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.scale, self.num_kv_heads = (
            num_heads,
            head_size,
            scale,
            num_kv_heads,
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if "tokens" not in _CONTEXT:
            raise RuntimeError("Attention called outside a forward context")
        tokens = _CONTEXT["tokens"]
        sequences = query.shape[0] // tokens
        q = query.view(sequences, tokens, self.num_heads, self.head_size).transpose(1, 2)
        k = key.view(sequences, tokens, self.num_kv_heads, self.head_size).transpose(1, 2)
        v = value.view(sequences, tokens, self.num_kv_heads, self.head_size).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        causal = torch.full(
            (tokens, tokens), torch.finfo(scores.dtype).min, dtype=scores.dtype
        ).triu(1)
        weights = F.softmax(scores + causal, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2)
        return out.reshape(sequences * tokens, self.num_heads * self.head_size)


# ------------------------------------------------------------------------------------------------
class Qwen2MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        x = self.act_fn(gate_up)
        x, _ = self.down_proj(x)
        return x


class Qwen2Attention(nn.Module):
    def __init__(self, config, bias: bool) -> None:
        super().__init__()
        self.total_num_heads, self.total_num_kv_heads = (
            config.num_attention_heads,
            config.num_key_value_heads,
        )
        self.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        )
        self.q_size, self.kv_size = (
            self.total_num_heads * self.head_dim,
            self.total_num_kv_heads * self.head_dim,
        )
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=bias,
        )
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=False)
        self.rotary_emb = RotaryEmbedding(self.head_dim, config.rope_parameters["rope_theta"])
        self.attn = Attention(
            self.total_num_heads, self.head_dim, self.head_dim**-0.5, self.total_num_kv_heads
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class Qwen3Attention(Qwen2Attention):
    """vLLM's qwen3.py: RMSNorm over each head of q and k (views [num_tokens, heads, head_dim]) before the
    rotary embedding."""

    def __init__(self, config, bias: bool, norm_cls: type) -> None:
        super().__init__(config, bias)
        self.q_norm = norm_cls(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = norm_cls(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q_by_head = q.view(*q.shape[:-1], q.shape[-1] // self.head_dim, self.head_dim)
        q_by_head = self.q_norm(q_by_head)
        q = q_by_head.view(q.shape)
        k_by_head = k.view(*k.shape[:-1], k.shape[-1] // self.head_dim, self.head_dim)
        k_by_head = self.k_norm(k_by_head)
        k = k_by_head.view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class Qwen2DecoderLayer(nn.Module):
    attention_bias = True

    def __init__(self, config, norm_cls: type) -> None:
        super().__init__()
        self.self_attn = self._attention(config, norm_cls)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    def _attention(self, config, norm_cls: type) -> nn.Module:
        return Qwen2Attention(config, bias=getattr(config, "attention_bias", self.attention_bias))

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = _normed_first(self.input_layernorm, hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = _normed_first(
            self.post_attention_layernorm, hidden_states, residual
        )
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


def _normed_first(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor):
    """The model code of a norm class that returns (residual, normed) unpacks it its own way."""
    first, second = norm(x, residual)
    return (second, first) if isinstance(norm, ResidualFirstRMSNorm) else (first, second)


class Qwen2Model(nn.Module):
    layer_cls = Qwen2DecoderLayer

    def __init__(self, config, norm_cls: type) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [self.layer_cls(config, norm_cls) for _ in range(config.num_hidden_layers)]
        )
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = _normed_first(self.norm, hidden_states, residual)
        return hidden_states


class Qwen2ForCausalLM(nn.Module):
    model_cls = Qwen2Model

    def __init__(self, config, norm_cls: type = RMSNorm) -> None:
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, norm_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head = self._tie(self.lm_head, self.model.embed_tokens)
        self.logits_processor = LogitsProcessor()

    @staticmethod
    def _tie(lm_head: ParallelLMHead, embed_tokens: VocabParallelEmbedding) -> nn.Module:
        return embed_tokens  # vLLM's qwen2.py: the head IS the embedding module

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)


class LlamaDecoderLayer(Qwen2DecoderLayer):
    attention_bias = False


class LlamaModel(Qwen2Model):
    layer_cls = LlamaDecoderLayer


class LlamaForCausalLM(Qwen2ForCausalLM):
    model_cls = LlamaModel

    @staticmethod
    def _tie(lm_head: ParallelLMHead, embed_tokens: VocabParallelEmbedding) -> nn.Module:
        return lm_head.tie_weights(
            embed_tokens
        )  # vLLM's llama.py: a head module of its own, never called


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    attention_bias = False

    def _attention(self, config, norm_cls: type) -> nn.Module:
        return Qwen3Attention(
            config, bias=getattr(config, "attention_bias", False), norm_cls=norm_cls
        )


class Qwen3Model(Qwen2Model):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    model_cls = Qwen3Model


# ------------------------------------------------------------------------------------------------
def from_hf(
    hf_model: nn.Module,
    *,
    norm_cls: type = RMSNorm,
    path: str = "native",
    ascend: str | None = None,
    norm_bias: bool = False,
) -> nn.Module:
    """A vLLM-style model of the HF model's config with its weights, loaded as vLLM's load_weights
    stacks them (q/k/v → qkv_proj, gate/up → gate_up_proj), in the HF model's dtype. ``path``: the
    norms' and rotary embeddings' implementation ("native"; "cuda" / "xpu": in-place fused add+norm and
    rotary). ``ascend``: "910" or "310p" — vLLM-Ascend's classes (``AscendRMSNorm``, its embedding and
    activation; on 310P the activation overrides ``forward``). ``norm_bias``: the Ascend norms carry a
    ``bias`` (a quantised checkpoint), zero until set."""
    config = hf_model.config
    cls = {
        "Qwen2ForCausalLM": Qwen2ForCausalLM,
        "LlamaForCausalLM": LlamaForCausalLM,
        "Qwen3ForCausalLM": Qwen3ForCausalLM,
    }[type(hf_model).__name__]
    dtype = next(hf_model.parameters()).dtype
    if ascend is not None and norm_cls is RMSNorm:
        norm_cls = AscendRMSNorm
    model = cls(config, norm_cls).to(dtype)
    if ascend is not None:
        _to_ascend(model, ascend)
    for module in model.modules():
        if norm_bias and isinstance(module, AscendRMSNorm):
            module.bias = nn.Parameter(torch.zeros_like(module.weight), requires_grad=False)
    source = hf_model.state_dict()
    stacked = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            fused = next((f for f in stacked if f".{f}." in name), None)
            if fused is None and name not in source and name.endswith("norm.bias"):
                continue  # a quantised checkpoint's norm bias: zero until the test sets it
            if fused is None:
                param.copy_(source[name])
            else:
                param.copy_(
                    torch.cat([source[name.replace(fused, part)] for part in stacked[fused]])
                )
    for module in model.modules():
        if isinstance(module, (RMSNorm, GemmaRMSNorm, RotaryEmbedding)) and not isinstance(
            module, AscendRMSNorm
        ):
            module.path = path
    return model.eval().requires_grad_(False)


def _to_ascend(model: nn.Module, chip: str) -> None:
    """What vLLM-Ascend's op registration does at start-up: the same tree with its subclasses."""
    act_cls = {"910": AscendSiluAndMul, "310p": AscendSiluAndMul310}[chip]
    embed = model.model.embed_tokens
    ascend_embed = AscendVocabParallelEmbedding(embed.num_embeddings, embed.embedding_dim).to(
        embed.weight.dtype
    )
    model.model.embed_tokens = ascend_embed
    if model.lm_head is embed:
        model.lm_head = ascend_embed
    elif model.lm_head.weight is embed.weight:
        model.lm_head.weight = ascend_embed.weight
    for layer in model.model.layers:
        layer.mlp.act_fn = act_cls()


def run(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """One engine step as vLLM's model runner does it: the prompts [sequences, tokens] flattened into
    input_ids and positions [num_tokens], the forward context set, the model called, logits computed."""
    sequences, tokens = input_ids.shape
    flat = input_ids.reshape(-1)
    positions = torch.arange(tokens).repeat(sequences)
    with set_forward_context(tokens), torch.inference_mode():
        hidden = model(
            input_ids=flat, positions=positions, intermediate_tensors=None, inputs_embeds=None
        )
        return model.compute_logits(hidden)
