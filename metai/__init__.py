"""A literate, notebook-first LLM framework: tokenizer to DeepSeek-style MoE, pretraining, alignment and fast inference

Modules:

- `metai.infer.kernels`: One Triton kernel for every matrix-vector product of a decode step: it streams the weights (bf16 or block-wise int4) once, and folds in what sits around the product (the RMSNorm before it, SwiGLU's `silu(a) * b` before the down-projection, the residual add after it); and a split (flash-decoding) attention for the new token. A dense layer is six kernels instead of about a dozen."""

__version__ = "0.1.0"
