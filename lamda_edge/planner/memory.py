"""The memory model: the peak of live tensor bytes of one LaMDA training step, itemized.

Every term is counted from what PyTorch and transformers allocate and what autograd saves for backward,
not fitted to measurements (docs/planner-accuracy.md checks it against `LiveTensorCounter` on real steps).
Notation (per step): B batch_size, T seq_len, N = B*T tokens, h hidden_size, I intermediate_size, n_h / n_kv
attention / key-value heads, d head_dim, V vocab_size, L layers, r_i the rank of adapted linear i,
e the bytes of the compute dtype (4 fp32, 2 bf16/fp16), w the bytes of an unquantized weight.

A step runs through phases; the peak is the largest phase, not a sum of everything:

    resident (weights, adapters, AdamW states)  is live in every phase
    forward      stored activations of all layers below + the current layer's working set
    loss         stored activations + the loss working set (chunked: one chunk of logits)
    backward     stored activations of the layers below + the top layer's saved set (recomputed under
                 checkpointing) + its gradient transients + the parameter gradients
    optimizer    gradients + AdamW's per-parameter temporaries

What autograd saves per decoder layer (Llama-style, SDPA attention, frozen base, LaMDA on all linears),
per token, counted op by op (tests/test_planner_memory.py checks it against the counter):

    2 x RMSNorm input, fp32 (pow/mul save the fp32 view of the input)  2h * 4 B
    RMSNorm rsqrt, fp32                                                 2 * 4 B
    RoPE'd q, k and v (SDPA inputs; GQA without repeat_kv, no mask)     (n_h + 2 n_kv) d * e
    SDPA output + log-sum-exp (fp32)                                    n_h d * e + n_h * 4 B
    with a padding mask: k, v repeated to n_h heads, SDPA's float mask  2 (n_h - n_kv) d * e + T * e
    gated MLP: gate (for SiLU), up and SiLU(gate) (for the product)     3I * e
    LaMDA, each adapted linear: A x in fp32 (for S's grad), s S A x     sum_i r_i (4 + [B trains] e) B
      in the compute dtype (for B's)
    frozen base weights (plain or NF4) save nothing that scales with N: their inputs are not kept.

PEFT LoRA / QLoRA (`method="lora"`, for `plan`'s comparison, planner/compare.py) as PEFT's defaults run them:
A (r x d_in) and B (d_out x r) train in fp32 (gradients, AdamW states), each LoRA layer keeps its input x in fp32
for A's gradient and A x for B's (`_adapter_saved`), and on an NF4 base `prepare_model_for_kbit_training` upcasts
every other parameter to fp32, so the whole step's activations are fp32 (`TrainSetup.peft_upcast`). Validated
against measured PEFT steps in docs/planner-accuracy.md (`tools/validate_planner.py --peft`).

Activation offload (`setup.activation_offload`, lamda_edge/train/offload.py around the forward) moves what autograd
saves outside the checkpointed blocks to host memory: every block's input (the checkpoint saves it), the final
norm's fp32 input, the chunked loss's inputs (without checkpointing: every saved tensor). The device keeps the
shared RoPE tables and mask, and gets one block's input back at a time in backward; `host_offload_bytes` is what
waits in host memory. (On the CPU the backward peak measures about three N*h*e above this term, constant in depth:
an open gap, docs/planner-accuracy.md.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lamda_edge.errors import ConfigError

# Rows per chunk of the chunked lm_head + loss (`lamda_edge.train.loss`): the one default of the loss, the run
# config, `plan --chunk-rows` and this model. It lives here, not in train/loss.py, because the planner and the CLI's
# `plan` must not import torch; the loss imports it from here.
DEFAULT_CHUNK_ROWS = 256
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
NF4_BLOCK = 64  # bitsandbytes NF4 block size (elements per absmax)
NF4_NESTED_BLOCK = 256  # double quantization: absmax blocks per second-level fp32 absmax
METHODS = ("lamda", "lora")  # the adapter the step trains: LaMDA, or PEFT LoRA / QLoRA (PEFT's defaults)
# linears that read the same input in a block: PEFT LoRA's A saves that input once when no cast copies it
SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})
OWN_SAVED_INPUTS = {"o_proj"}  # its input is SDPA's output (a view of it), which SDPA saves for its own backward


@dataclass(frozen=True)
class Linear:
    """One adapted linear layer of a transformer block: its short name and shape."""

    name: str
    d_in: int
    d_out: int
    bias: bool = False


@dataclass(frozen=True)
class TrainSetup:
    """What the step looks like: the knobs the planner searches over or the user pins."""

    batch_size: int = 1
    seq_len: int = 512
    rank: int = 16
    ranks: tuple[int, ...] | None = None  # per adapted linear of one block, overrides `rank` (LaMDA++)
    quantize: str | None = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    checkpoint_layers: int | None = None  # with checkpointing: only the lowest this many blocks recompute; None = all
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS  # chunked loss rows; None = the model's own (full-logits) loss
    compute_dtype: str = "bf16"
    weight_dtype: str | None = None  # unquantized weights (embeddings, norms, plain base); None = compute dtype
    b_trainable: bool = True  # before t_i; False after B froze (only S trains)
    padding_mask: bool = True  # batches padded to the longest row carry an attention mask (see saved_per_token)
    lamda_dtype: str = "fp32"  # A, S, B are kept in float32
    activation_offload: bool = False  # what autograd saves outside checkpointed blocks waits in host memory
    method: str = "lamda"  # "lora": PEFT LoRA with PEFT's defaults (on an NF4 base: QLoRA), for the comparison
    init: str = "principal"  # LaMDA's init: "random-residual" keeps a frozen fp32 low-rank term per layer
    fp32_upcast: bool = True  # QLoRA: prepare_model_for_kbit_training's upcast (False: priced without it)

    @property
    def peft_upcast(self) -> bool:
        """QLoRA as PEFT runs it: `prepare_model_for_kbit_training` casts every parameter that is not 4-bit
        (embeddings, norms, head) to fp32, so the residual stream and every activation are fp32."""
        return self.method == "lora" and self.quantize == "nf4" and self.fp32_upcast

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "rank") + (("checkpoint_layers",) if self.checkpoint_layers else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{name}` should be a positive integer, got {value!r}")
        if self.method not in METHODS:
            raise ConfigError(f"`method` should be one of {METHODS}, got {self.method!r}")
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"`quantize` should be 'nf4' or None, got {self.quantize!r}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows < 1):
            raise ConfigError(f"`chunk_rows` should be a positive integer or None, got {self.chunk_rows!r}")
        for name in ("compute_dtype", "lamda_dtype") + (("weight_dtype",) if self.weight_dtype else ()):
            if getattr(self, name) not in DTYPE_BYTES:
                raise ConfigError(f"`{name}` should be one of {sorted(DTYPE_BYTES)}, got {getattr(self, name)!r}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Estimate:
    """The model's answer: the peak, the phase it happens in, and what is live then."""

    tensor_peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]  # what is live at the peak; sums to tensor_peak_bytes
    phases: dict[str, int]  # every phase's total
    resident: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    host_offload_bytes: int = 0  # activation offload: saved activations held in host memory at the peak


# ---- resident: weights, adapters, optimizer state --------------------------------------------------------------


def nf4_bytes(n: int, double_quant: bool) -> int:
    """Bytes of one NF4 weight of n elements, with its quantization constants (bitsandbytes layout).

    packed 4-bit values n/2 B; absmax one per 64-block: uint8 with double quantization (+ an fp32 absmax per 256
    blocks, a 256-entry fp32 code and an fp32 offset), else fp32; plus the 16-entry fp32 NF4 code.
    """
    blocks = math.ceil(n / NF4_BLOCK)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + 256 * 4 + 4
    else:
        constants = 4 * blocks
    return math.ceil(n / 2) + constants + 16 * 4


def resident_bytes(shape, setup: TrainSetup, linears: list[Linear], ranks: list[int]) -> tuple[dict[str, int], int]:
    """Weights, LaMDA buffers/parameters and AdamW state; returns (itemized bytes, trainable parameter count)."""
    w = DTYPE_BYTES[setup.weight_dtype or setup.compute_dtype]
    f = DTYPE_BYTES[setup.lamda_dtype]
    blocks = shape.num_blocks
    out: dict[str, int] = {}
    # embeddings V*h*w; an untied output head another V*h*w (heads are never quantized)
    out["embeddings"] = shape.vocab_size * shape.hidden_size * w
    if not shape.tie_word_embeddings:
        out["lm_head"] = shape.vocab_size * shape.hidden_size * w
    # norms: 2 per block + the final one, h*w each (LayerNorm adds a bias: x2)
    out["norms"] = (2 * blocks + 1) * shape.hidden_size * w * shape.norm_params
    base = packed = 0
    for lin in linears:
        n = lin.d_in * lin.d_out
        if setup.quantize == "nf4":
            packed += nf4_bytes(n, setup.double_quant)  # see nf4_bytes
        else:
            base += n * w
        base += lin.d_out * w if lin.bias else 0
    if setup.quantize == "nf4":
        out["base_weights_nf4"] = packed * blocks
    out["base_biases" if setup.quantize == "nf4" else "base_weights"] = base * blocks  # NF4: only biases stay float
    if shape.extra_params:
        out["other_weights"] = shape.extra_params * w  # position/relative embeddings, classifier, ...
    a = sum(r * lin.d_in for r, lin in zip(ranks, linears)) * blocks
    s = sum(r * r for r in ranks) * blocks
    b = sum(r * lin.d_out for r, lin in zip(ranks, linears)) * blocks
    if setup.method == "lora":  # PEFT LoRA: A r*d_in and B d_out*r, both trained, fp32 (PEFT's adapter dtype)
        out["lora_A"] = a * 4
        out["lora_B"] = b * 4
        trainable, n_tensors = a + b, 2 * len(linears) * blocks
    else:  # LaMDA: A r*d_in (frozen buffer), S r*r, B d_out*r, all fp32 (+ an int64 frozen counter)
        out["lamda_A"] = a * f + 8 * len(linears) * blocks
        out["lamda_S"] = s * f
        out["lamda_B"] = b * f
        if setup.init == "random-residual":  # the principal part U (d_out x r) and Vt (r x d_in), frozen, fp32
            out["lamda_frozen_term"] = (a + b) * 4
        trainable = s + (b if setup.b_trainable else 0)
        n_tensors = len(linears) * blocks * (2 if setup.b_trainable else 1)
    # AdamW: exp_avg + exp_avg_sq in fp32 per trainable element, plus a 4 B step tensor per parameter tensor
    out["adamw_states"] = 2 * 4 * trainable + 4 * n_tensors
    # the batch itself: input_ids and labels, int64 (B*T*8 each)
    out["batch"] = 2 * setup.tokens * 8
    return {k: v for k, v in out.items() if v}, trainable


# ---- activations -------------------------------------------------------------------------------------------------


def saved_per_token(shape, setup: TrainSetup, ranks: list[int]) -> float:
    """Bytes autograd saves per token in one block's forward (the table in the module docstring)."""
    e = DTYPE_BYTES[setup.compute_dtype]
    h, d, nh, nkv, inter = shape.hidden_size, shape.head_dim, shape.num_attention_heads, shape.num_key_value_heads, (
        shape.intermediate_size
    )
    adapter = _adapter_saved(setup, ranks, shape.block_linears())
    if shape.architecture == "decoder":
        norms = 2 * h * 4 + 2 * 4  # fp32 norm inputs + rsqrt
        # with a padding mask transformers cannot use SDPA's GQA: repeat_kv copies k and v to n_h heads
        kv = nh if setup.padding_mask else nkv
        attn = (nh + 2 * kv) * d * e + nh * d * e + nh * 4  # q, k, v, SDPA output, log-sum-exp
        if setup.padding_mask:  # SDPA saves the additive float mask (B, 1, T, T) per block: T*e per token
            attn += setup.seq_len * e
        mlp = (3 if shape.mlp == "gated" else 1) * inter * e  # gate, up, SiLU(gate) | GELU input
        return norms + attn + mlp + adapter
    if shape.architecture == "encoder":  # LayerNorm, eager attention: approximate, not validated on this machine
        norms = 2 * (h * e + 2 * 4)  # LayerNorm input + mean + rstd
        attn = (nh + 2 * nkv) * d * e + nh * d * e + 2 * nh * setup.seq_len * e  # q, k, v, context, scores + probs
        return norms + attn + inter * e + adapter
    return _encoder_decoder_saved_per_token(shape, setup, adapter)


def top_saved_decoder(shape, setup: TrainSetup, ranks: list[int]) -> float:
    """Bytes per token one BART decoder block saves (`_encoder_decoder_saved_per_token`'s decoder term)."""
    linears = shape.block_linears()
    return _encoder_decoder_saved_per_token(shape, setup, _adapter_saved(setup, ranks, linears), decoder_only=True)


def _adapter_saved(setup: TrainSetup, ranks: list[int], linears: list[Linear]) -> float:
    """Per token, what the adapters of one block save for backward.

    LaMDA: A x (fp32, for S's grad) and s S A x (compute dtype, while B trains): r_i (4 + e) per linear.
    PEFT LoRA: A's input x in fp32 (for A's grad) and A x (for B's grad): d_in + r_i per linear, 4 B each. With
    fp32 activations x is the layer input itself, shared by the linears that read it (q, k, v; gate, up); in a
    16-bit compute dtype PEFT casts x to fp32 once per linear, and each cast is kept. (The output projection's
    input is SDPA's output, which SDPA saves already: in fp32 it costs nothing more.)
    """
    if setup.method == "lora":
        if DTYPE_BYTES[setup.compute_dtype] == 4:
            inputs = {next((tuple(sorted(g)) for g in SHARED_INPUTS if lin.name in g), lin.name): lin.d_in
                      for lin in linears if lin.name not in OWN_SAVED_INPUTS}
            kept_x = sum(inputs.values())
        else:
            kept_x = sum(lin.d_in for lin in linears)
        return (kept_x + sum(ranks)) * 4
    return sum(ranks) * (4 + (DTYPE_BYTES[setup.compute_dtype] if setup.b_trainable else 0))


def _encoder_decoder_saved_per_token(shape, setup: TrainSetup, adapter: float, decoder_only: bool = False) -> float:
    """BART's blocks (post-LayerNorm, SDPA, GELU MLP, dropout 0.1 as BART ships), counted op by op on the CPU and
    averaged over the encoder and decoder blocks (validated in tests/test_planner_memory.py):

        every attention        q, k, v, output (B, n, T, d) and SDPA's log-sum-exp (n fp32)
        padding mask           the source's additive float mask, saved by SDPA: encoder self-attention and decoder
                               cross-attention (the decoder's self-attention is causal: no mask tensor)
        LayerNorm              input + mean + rstd, after each attention and the MLP
        MLP                    GELU's input (fc1's output); fc1's and fc2's inputs are not saved (frozen base)
        dropout                its float noise (h per token, compute dtype; 1 byte on CUDA, counted as e here)
        cross-attention        adds q, k, v, output, log-sum-exp, a LayerNorm, a dropout and 4 adapted linears
    """
    e = DTYPE_BYTES[setup.compute_dtype]
    h, d, nh, nkv, inter = shape.hidden_size, shape.head_dim, shape.num_attention_heads, shape.num_key_value_heads, (
        shape.intermediate_size
    )
    attn = (nh + 2 * nkv) * d * e + nh * d * e + nh * 4
    mask = setup.seq_len * e if setup.padding_mask else 0
    norm, dropout = h * e + 2 * 4, h * e
    encoder = attn + mask + 2 * norm + inter * e + 2 * dropout + adapter
    cross_adapter = adapter * 4 / max(len(shape.block_linears()), 1)  # q, k, v, o of the cross-attention
    decoder = 2 * attn + mask + 3 * norm + inter * e + 3 * dropout + adapter + cross_adapter
    if decoder_only:
        return decoder
    layers_e, layers_d = shape.num_hidden_layers, shape.num_decoder_layers
    return (layers_e * encoder + layers_d * decoder) / max(layers_e + layers_d, 1)


def estimate(shape, setup: TrainSetup) -> Estimate:
    """Predict the peak of live tensor bytes of one steady-state training step (optimizer state exists).

    Args:
        shape: a `ModelShape` (profiles.py).
        setup: the step's configuration.

    Returns:
        An `Estimate` with the peak, its phase, and the itemized bytes live at the peak.
    """
    if setup.peft_upcast:  # QLoRA: every activation is fp32 (see TrainSetup.peft_upcast)
        setup = replace(setup, compute_dtype="fp32", weight_dtype="fp32")
    linears = shape.block_linears()
    ranks = list(setup.ranks) if setup.ranks else [min(setup.rank, lin.d_in, lin.d_out) for lin in linears]
    if len(ranks) != len(linears):
        raise ConfigError(f"`ranks` should give one rank per adapted linear ({len(linears)}), got {len(ranks)}")
    resident, trainable = resident_bytes(shape, setup, linears, ranks)
    e = DTYPE_BYTES[setup.compute_dtype]
    N, T, h, inter, V = setup.tokens, setup.seq_len, shape.hidden_size, shape.intermediate_size, shape.vocab_size
    L = shape.num_blocks
    saved_layer = saved_per_token(shape, setup, ranks) * N  # one block's saved set
    # shared by all blocks: RoPE cos/sin (1, T, d) in the compute dtype
    shared = 2 * T * shape.head_dim * e if shape.architecture == "decoder" else 0
    # a padding mask: the (B, 1, T, T) bool mask built once per forward and kept for every block's recompute
    # (its float copy, saved per block by SDPA, is in saved_per_token)
    shared += setup.batch_size * T * T if setup.padding_mask and shape.architecture == "decoder" else 0
    # stored between forward and backward: with checkpointing each block keeps only its input (N*h*e);
    # partial checkpointing: the lowest `ckpt` blocks keep their input, the blocks above keep their saved sets
    ckpt = checkpointed_block_count(setup, L)
    if shape.architecture == "encoder-decoder":
        # BART has no final norm: outside the blocks, the encoder's and the decoder's embedding LayerNorm (input,
        # mean, rstd) and dropout noise; under checkpointing also the encoder's output (every decoder block's
        # cross-attention input) and, like a decoder's mask, the two additive float masks (self, cross) that the
        # checkpointed blocks take as arguments
        outside_blocks = 2 * (2 * N * h * e + N * 8) + (N * h * e if ckpt else 0)
        shared += 2 * setup.batch_size * T * T * e if ckpt and setup.padding_mask else 0
    else:  # the last block's output is kept by the final norm (fp32 view, N*h*4 + rsqrt N*4)
        outside_blocks = N * h * 4 + N * 4
    stored_blocks = ckpt * N * h * e + (L - ckpt) * saved_layer
    top_ckpt = ckpt == L  # the top block (where forward ends and backward starts) is checkpointed
    # activation offload (train/offload.py around the forward): what autograd saves outside the checkpointed
    # blocks -- each block's input (the checkpoint saves it), the final norm's fp32 input, and without checkpointing
    # every saved tensor -- goes to host memory; the device keeps the shared RoPE tables and mask (kwargs of the
    # checkpoint, not saved tensors), and in backward gets one block's saved set back at a time (top_stored below)
    host = stored_blocks + outside_blocks if setup.activation_offload else 0
    stored = stored_blocks + outside_blocks + shared - host
    # NF4 base: each matmul dequantizes its weight to the compute dtype first (transient d_out*d_in*e)
    dequant = max(lin.d_in * lin.d_out for lin in linears) * e if setup.quantize == "nf4" else 0
    mlp_mid = N * inter * e  # the gated product / activation being built
    # ---- loss: the head's logits, fp32, for `rows` rows at a time ----
    rows_all = setup.batch_size * (setup.seq_len - 1)  # shifted: the last position predicts nothing
    if shape.architecture == "encoder":
        rows, shifted_copy = setup.batch_size, 0  # a sequence classifier: B x num_labels logits
        V = shape.num_labels
    elif setup.chunk_rows is None:
        rows, shifted_copy = N, 0  # the model's own loss: all logits at once
    else:
        rows, shifted_copy = min(setup.chunk_rows, rows_all), rows_all * h * e  # hidden[:, :-1] copy, kept
    logits_fp32 = rows * V * 4
    logits_e = rows * V * e if e != 4 else 0  # the head's output before .float()
    last_hidden = N * h * e  # the final norm's output, alive while the loss runs
    # forward through the loss: logits (+ fp32 copy) and log_softmax output live together
    loss_fwd = shifted_copy + last_hidden + logits_e + 2 * logits_fp32
    # backward of the loss: saved log_softmax + nll grad + log_softmax grad (3 fp32 copies) and, from the second
    # chunk on, the hidden states' gradient accumulated so far (N*h*e); a chunk's own hidden gradient comes after
    # its logits' gradients are freed
    chunks = math.ceil(rows_all / rows) if shifted_copy else 1
    loss_bwd = shifted_copy + 3 * logits_fp32 + (N * h * e if chunks > 1 else 0)
    if setup.activation_offload and shifted_copy:  # each chunk's input was offloaded: one comes back at a time
        host += shifted_copy
        loss_bwd += rows * h * e - shifted_copy
    # ---- backward through the top block ----
    # under checkpointing the block's saved set is rebuilt; its fp32 norm input is the stored input itself
    # when e == 4, so only the rest is new
    recompute = saved_layer - (N * h * 4 if e == 4 else 0)
    if shape.architecture == "encoder-decoder":  # backward starts in the top decoder block (more than the average)
        recompute = top_saved_decoder(shape, setup, ranks) * N
    top_stored = N * h * e if top_ckpt else saved_layer
    below = stored - (0 if setup.activation_offload else top_stored)  # blocks under the top one (offload: on host)
    # gradient transients at the MLP's input-gradient step: the block output's grad (N*h*e); down_proj's input
    # grad from the frozen base (N*I*e) and from the adapter path (N*I*e: A is cast to e, not x to fp32), which
    # autograd adds into the first in place -- the same count holds for d(act), d(up), d(gate)
    # (an NF4 weight's dequantized copy lives only during its own matmul, before this sum: not added here)
    grad_transient = N * h * e + 2 * N * inter * e
    if setup.method == "lora" and e == 4:
        # PEFT LoRA: down_proj's kept input (x, for lora_A's grad) is freed by then. (In a 16-bit dtype the adapter
        # path's gradient is fp32 first, N*I*4, before the cast back: it takes the freed x's place)
        grad_transient -= N * inter * 4
    if shape.architecture == "encoder-decoder":  # the encoder output's gradient, summed over the decoder blocks
        grad_transient += N * h * e
    grads = trainable * 4  # parameter gradients (fp32, S and B)
    phases = {
        # forward through the top block: without checkpointing its saved set plus the MLP product and down_proj's
        # output temporaries (base out, B S A x, scaled: 3 N*h*e); under checkpointing nothing is saved, and the
        # working set is its input and residual (2 N*h*e) with SiLU(gate), up and their product (3 N*I*e)
        "forward": below + (saved_layer + mlp_mid + 3 * N * h * e if not top_ckpt
                            else 2 * N * h * e + 3 * mlp_mid) + dequant,
        "loss": stored + loss_fwd,
        # no parameter gradient exists yet: the step starts from zero_grad(set_to_none=True), and the head is frozen
        "loss_backward": stored + loss_bwd,
        "backward": below + top_stored + (recompute if top_ckpt else 0) + grad_transient + grads,
        # AdamW: single-tensor on CPU makes exp_avg_sq.sqrt() and a scaled copy per parameter; foreach on CUDA makes
        # them for all parameters at once: count 2 copies of all trainable parameters (fp32)
        "optimizer": grads + 2 * trainable * 4,
    }
    peak_phase = max(phases, key=phases.get)
    res_total = sum(resident.values())
    live = dict(resident)
    live.update(_phase_items(peak_phase, stored=stored, loss_fwd=loss_fwd, loss_bwd=loss_bwd, grads=grads,
                             below=below, top=phases["backward"] - below - grads, fwd=phases["forward"],
                             opt=phases["optimizer"] - grads))
    live = {k: int(v) for k, v in live.items() if v}
    return Estimate(
        tensor_peak_bytes=int(res_total + phases[peak_phase]),
        peak_phase=peak_phase,
        breakdown=live,
        phases={k: int(v + res_total) for k, v in phases.items()},
        resident=resident,
        trainable_params=trainable,
        host_offload_bytes=int(host),
    )


def checkpointed_block_count(setup: TrainSetup, num_blocks: int) -> int:
    """How many of the `num_blocks` blocks recompute in backward: none without checkpointing, else the lowest
    `checkpoint_layers` (all when it is None or more than there are)."""
    if not setup.gradient_checkpointing:
        return 0
    return num_blocks if setup.checkpoint_layers is None else min(setup.checkpoint_layers, num_blocks)


def _phase_items(phase: str, **parts) -> dict[str, float]:
    """The non-resident items live in `phase`, named for the breakdown table."""
    if phase == "forward":
        return {"activations_forward": parts["fwd"]}
    if phase == "loss":
        return {"activations_stored": parts["stored"], "loss_logits": parts["loss_fwd"]}
    if phase == "loss_backward":
        return {"activations_stored": parts["stored"], "loss_logits": parts["loss_bwd"]}
    if phase == "backward":
        return {"activations_stored": parts["below"], "top_block_backward": parts["top"], "gradients": parts["grads"]}
    return {"gradients": parts["grads"], "optimizer_temporaries": parts["opt"]}
