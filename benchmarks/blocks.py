"""Benchmark (a): one double + one single block at real FLUX.1 dims, fluxkit vs diffusers, side by side.

    python -m benchmarks.blocks [--dtype bf16] [--sizes 512 1024] [--repeat 3] [--compile]

Both implementations get the same weights (converted through fluxkit.convert) and the same inputs; the script checks
they agree, then times a forward of [double block -> single block] at 512^2 (1024 image tokens) and 1024^2 (4096
image tokens) with 512 text tokens, and reports achieved GFLOP/s against a matmul peak measured in the same run: the
better of a 2048^2 matmul and one shaped like FLUX's MLP linear ([4096, 3072] @ [3072, 12288]).
--compile adds fluxkit with `torch.compile` on both blocks (Flux.compile_repeated_blocks), against eager diffusers
as users run it; the compilation itself is left out of the timing. The implementations are timed round-robin.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks.common import describe_machine, timeit_interleaved
from fluxkit.devices import parse_dtype
from fluxkit.layers import DoubleStreamBlock, EmbedND, SingleStreamBlock
from fluxkit.params import FLUX_DEV
from fluxkit.sampling import image_ids, text_ids

TXT_TOKENS = 512


def block_flops(l_img: int, l_txt: int, hidden: int, mlp: int) -> float:
    """Matmul FLOPs of one double + one single block forward (2 per multiply-add)."""
    seq = l_img + l_txt
    double_linear = 2 * (3 * hidden * hidden + hidden * hidden + 2 * hidden * mlp) * seq  # both streams together
    single_linear = (3 * hidden * hidden + hidden * mlp + (hidden + mlp) * hidden) * seq
    attention = 2 * (2 * seq * seq * hidden)  # QK^T and PV, per block
    modulation = 0  # per sample, negligible
    return 2.0 * (double_linear + single_linear) + 2.0 * attention + modulation


def build(dtype: torch.dtype):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    p = FLUX_DEV
    torch.manual_seed(0)
    ours_d = DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias).to(dtype).eval()
    ours_s = SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio).to(dtype).eval()
    ref_d = FluxTransformerBlock(p.hidden_size, p.num_heads, p.head_dim).to(dtype).eval()
    ref_s = FluxSingleTransformerBlock(p.hidden_size, p.num_heads, p.head_dim).to(dtype).eval()
    _copy_weights(ours_d, ours_s, ref_d, ref_s)
    return ours_d, ours_s, ref_d, ref_s


def _copy_weights(ours_d, ours_s, ref_d, ref_s) -> None:
    """Reuse fluxkit's checkpoint converter so both sides compute with identical weights."""
    from fluxkit.convert import transformer_bfl_to_diffusers

    bfl = {f"double_blocks.0.{k}": v for k, v in ours_d.state_dict().items()}
    bfl.update({f"single_blocks.0.{k}": v for k, v in ours_s.state_dict().items()})
    diff = transformer_bfl_to_diffusers(_with_embedders(bfl, ours_d))
    ref_d.load_state_dict({k[len("transformer_blocks.0.") :]: v for k, v in diff.items()
                           if k.startswith("transformer_blocks.0.")})
    ref_s.load_state_dict({k[len("single_transformer_blocks.0.") :]: v for k, v in diff.items()
                           if k.startswith("single_transformer_blocks.0.")})


def _with_embedders(sd: dict, block) -> dict:
    """The converter maps whole checkpoints: add placeholder embedders of the right shapes."""
    from fluxkit.convert import expected_bfl_shapes

    shapes = expected_bfl_shapes(replace(FLUX_DEV, depth=1, depth_single_blocks=1))
    out = {k: torch.zeros(s, dtype=block.img_mod.lin.weight.dtype) for k, s in shapes.items() if k not in sd}
    out.update(sd)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time fluxkit's blocks under torch.compile")
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    print(describe_machine())
    from benchmarks.matmul_peak import peak_gflops

    square, linear = peak_gflops(dtype, 2048), peak_gflops(dtype, 4096, 3072, 12288)
    peak = max(square, linear)
    print(f"measured {args.dtype} matmul peak: {square:.0f} GFLOP/s at 2048^2, {linear:.0f} at [4096, 3072] @ [3072, "
          f"12288]; using {peak:.0f}")
    ours_d, ours_s, ref_d, ref_s = build(dtype)
    compiled = (torch.compile(ours_d), torch.compile(ours_s)) if args.compile else None
    p = FLUX_DEV
    rope = EmbedND(p.theta, p.axes_dim)
    print(f"{'size':>6} {'tokens':>7} {'fluxkit s':>10} {'diffusers s':>12} {'ratio':>6} {'fluxkit GF/s':>13} "
          f"{'% peak':>7} {'diffusers % peak':>17} {'max |diff|':>10}"
          + (f" {'compiled s':>11} {'ratio':>6} {'% peak':>7}" if compiled else ""))
    for size in args.sizes:
        l_img = (size // 16) ** 2
        img = torch.randn(1, l_img, p.hidden_size, dtype=dtype)
        txt = torch.randn(1, TXT_TOKENS, p.hidden_size, dtype=dtype)
        vec = torch.randn(1, p.hidden_size, dtype=dtype)
        ids = torch.cat((text_ids(1, TXT_TOKENS), image_ids(1, size // 16, size // 16)), dim=1)
        pe = rope(ids)
        cos_sin = _diffusers_rope(ids[0])

        def run_ours(img=img, txt=txt, vec=vec, pe=pe, blocks=(ours_d, ours_s)):
            i, t = blocks[0](img, txt, vec, pe)
            return blocks[1](torch.cat((t, i), 1), vec, pe)

        def run_ref(img=img, txt=txt, vec=vec, cos_sin=cos_sin):
            t, i = ref_d(img, txt, vec, image_rotary_emb=cos_sin)
            t, i = ref_s(i, t, vec, image_rotary_emb=cos_sin)
            return torch.cat((t, i), 1)

        with torch.inference_mode():
            diff = (run_ours().float() - run_ref().float()).abs().max().item()
            fns = {"ours": run_ours, "ref": run_ref}
            if compiled:  # the warmup call compiles (once per shape); its output is checked like the eager one
                fns["compiled"] = lambda: run_ours(blocks=compiled)
                diff_comp = (fns["compiled"]().float() - run_ref().float()).abs().max().item()
            times = timeit_interleaved(fns, warmup=1, repeat=args.repeat)
            t_ours, t_ref, t_comp = times["ours"], times["ref"], times.get("compiled")
        flops = block_flops(l_img, TXT_TOKENS, p.hidden_size, p.mlp_hidden_dim)
        line = (f"{size:>5}² {l_img + TXT_TOKENS:>7} {t_ours:>10.3f} {t_ref:>12.3f} {t_ours / t_ref:>6.2f} "
                f"{flops / t_ours / 1e9:>13.0f} {100 * flops / t_ours / 1e9 / peak:>6.0f}% "
                f"{100 * flops / t_ref / 1e9 / peak:>16.0f}% {diff:>10.3g}")
        if compiled:
            line += f" {t_comp:>11.3f} {t_comp / t_ref:>6.2f} {100 * flops / t_comp / 1e9 / peak:>6.0f}%"
            line += f"  (compiled max |diff| {diff_comp:.3g})"
        print(line)


def _diffusers_rope(ids: torch.Tensor):
    from diffusers.models.embeddings import FluxPosEmbed

    return FluxPosEmbed(theta=FLUX_DEV.theta, axes_dim=list(FLUX_DEV.axes_dim))(ids)


if __name__ == "__main__":
    main()
