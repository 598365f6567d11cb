"""Stage `cache`: encode N scenes once (latents + caption embeddings) so the transformer stages never run the
autoencoder encoder or the text encoder.

Layout of a cache run folder:

    chunks/chunk-00012.safetensors   scenes [12*chunk_size, 13*chunk_size), grouped by image size:
                                     "{W}x{H}/latents" [n, 16, h, w] fp32, already scale/shift-ed (AutoEncoder.encode
                                     of the posterior mean), "{W}x{H}/txt" [n, L, 384] bf16 MiniLM token states,
                                     "{W}x{H}/vec" [n, 384] pooled vectors, "{W}x{H}/index" [n] scene indices;
                                     metadata "captions/{W}x{H}": the captions as a JSON list
    prompts.safetensors              the empty prompt (caption dropout) and the fixed sample-grid prompts
    cache.json                       what was encoded: scene seed/n/sizes, the autoencoder (relative path + params)

A chunk file appears whole (temp + rename) and depends only on (seed, its index), so a killed or `--max-minutes`
run resumes by skipping the chunks that exist. Under torchrun, rank r encodes chunks r, r + world, ...
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..autoencoder import AutoEncoder
from ..data import SceneDataset
from ..params import AutoEncoderParams
from .ae import AE_META, images_to_tensor, load_trained_ae
from .config import CacheOptions, TrainConfig
from .loop import Dist, RunFolder, resolve_run

CACHE_META, PROMPTS_FILE = "cache.json", "prompts.safetensors"


def chunk_path(root: Path, index: int) -> Path:
    return root / "chunks" / f"chunk-{index:05d}.safetensors"


@torch.no_grad()
def encode_chunk(data: SceneDataset, start: int, stop: int, ae: AutoEncoder, encoder, length: int,
                 batch: int, bf16: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Scenes [start, stop) -> (tensors, metadata) of one chunk file, grouped by image size."""
    device = ae.encoder.conv_in.weight.device
    groups = defaultdict(list)
    for i in range(start, stop):
        sample = data[i]
        groups[f"{sample.scene.width}x{sample.scene.height}"].append((i, sample))
    tensors, metadata = {}, {}
    for key, members in sorted(groups.items()):
        latents, txts, vecs = [], [], []
        for j in range(0, len(members), batch):
            part = members[j : j + batch]
            x = images_to_tensor([s.image for _, s in part]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                latents.append(ae.encode(x).float().cpu())  # [b, 16, h, w], scaled and shifted
            txt, vec = encoder.encode([s.caption for _, s in part], None, length)  # [b, L, 384], [b, 384]
            txts.append(txt.to(torch.bfloat16).cpu())
            vecs.append(vec.float().cpu())
        tensors[f"{key}/latents"] = torch.cat(latents).contiguous()
        tensors[f"{key}/txt"] = torch.cat(txts).contiguous()
        tensors[f"{key}/vec"] = torch.cat(vecs).contiguous()
        tensors[f"{key}/index"] = torch.tensor([i for i, _ in members], dtype=torch.int64)
        metadata[f"captions/{key}"] = json.dumps([s.caption for _, s in members])
    return tensors, metadata


def build_cache(cfg: TrainConfig, run: RunFolder, dist: Dist, runs_dir: Path, *, max_minutes: float | None = None,
                quiet: bool = False) -> bool:
    """Encode every missing chunk (this rank's share); rank 0 then writes prompts + cache.json. True when complete."""
    from ..text import MiniLMEncoder

    opts: CacheOptions = cfg.options
    spec = cfg.spec()
    if spec.text_encoder != "minilm":
        raise ValueError(f"the cache stage encodes captions with MiniLM; preset {cfg.model!r} expects "
                         f"{spec.text_encoder!r}")
    ae_root = resolve_run(Path(runs_dir), opts.ae, "autoencoder")
    ae = load_trained_ae(ae_root, dist.device)
    # bf16: MiniLM held in bf16 as the pipeline holds it on bf16-fast devices, so training sees inference's embeddings.
    bf16 = cfg.train.bf16
    encoder = MiniLMEncoder.from_package(dtype=torch.bfloat16 if bf16 else None).to(dist.device)
    data = SceneDataset(cfg.data.seed, cfg.data.n, sizes=cfg.data.sizes, kinds=cfg.data.kinds, pairs="train",
                        state=cfg.data.state, pin=cfg.data.pin)
    n_chunks = math.ceil(cfg.data.n / opts.chunk_size)
    (run.root / "chunks").mkdir(exist_ok=True)
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    rounds = math.ceil(n_chunks / dist.world)
    bar = tqdm(total=n_chunks, desc=cfg.name, unit="chunk", disable=quiet or not dist.is_main, dynamic_ncols=True)
    worked = False  # the budget is checked only after real work, so every call makes progress
    for r in range(rounds):
        c = r * dist.world + dist.rank
        path = chunk_path(run.root, c)
        if c < n_chunks and not path.is_file():
            worked = True
            start, stop = c * opts.chunk_size, min((c + 1) * opts.chunk_size, cfg.data.n)
            tensors, metadata = encode_chunk(data, start, stop, ae, encoder, spec.max_sequence_length,
                                             opts.encode_batch, bf16)
            atomic_save_safetensors(path, tensors, metadata)
        bar.update(min(dist.world, n_chunks - r * dist.world))
        if dist.any(worked and time.monotonic() > deadline):
            break
    bar.close()
    dist.barrier()
    complete = all(chunk_path(run.root, c).is_file() for c in range(n_chunks))
    if complete and dist.is_main:
        _write_prompts(run.root, encoder, [""] + list(opts.prompts), spec.max_sequence_length)
        meta = {"scenes": {"seed": cfg.data.seed, "n": cfg.data.n, "sizes": cfg.data.sizes, "kinds": cfg.data.kinds,
                           "pairs": "train", "state": list(cfg.data.state), "pin": cfg.data.pin},
                "chunks": n_chunks, "ae": os.path.relpath(ae_root, run.root),
                "ae_params": json.loads((ae_root / AE_META).read_text())["params"],
                "text_encoder": "minilm", "max_sequence_length": spec.max_sequence_length}
        atomic_write_text(run.root / CACHE_META, json.dumps(meta, indent=2))
        run.mark_done({"stage": "cache", "scenes": cfg.data.n, "chunks": n_chunks})
    dist.barrier()
    return complete


def _write_prompts(root: Path, encoder, prompts: list[str], length: int) -> None:
    txt, vec = encoder.encode(prompts, None, length)  # [P, L, 384], [P, 384]
    tensors = {"txt": txt.to(torch.bfloat16).cpu().contiguous(), "vec": vec.float().cpu().contiguous()}
    metadata = {"prompts": json.dumps(prompts)}
    atomic_save_safetensors(root / PROMPTS_FILE, tensors, metadata)


# ------------------------------------------------------------------------------------------------ reading a cache
@dataclass
class Bucket:
    """All cached scenes of one image size."""

    size: tuple[int, int]  # (width, height)
    latents: Tensor  # [n, 16, h, w] fp32, scaled
    txt: Tensor  # [n, L, 384] bf16
    vec: Tensor  # [n, 384]
    index: Tensor  # [n] scene indices
    captions: list[str]
    loss_weight: Tensor | None = None  # [n, tokens] per-token loss weights (flow.edge_weight), or None

    def __len__(self) -> int:
        return len(self.index)


@dataclass
class LatentCache:
    buckets: list[Bucket]
    prompts: list[str]  # sample-grid prompts
    prompt_txt: Tensor  # [P, L, 384]
    prompt_vec: Tensor  # [P, 384]
    empty_txt: Tensor  # [1, L, 384]: the empty prompt, for caption dropout and true CFG
    empty_vec: Tensor  # [1, 384]
    ae_root: Path
    ae_params: AutoEncoderParams
    scenes: dict | None = None  # the SceneDataset arguments its scenes came from (cache.json "scenes")

    @classmethod
    def load(cls, root: Path) -> LatentCache:
        meta_path = Path(root) / CACHE_META
        if not meta_path.is_file():
            raise ValueError(f"{root} is not a finished cache run ({CACHE_META} missing): finish the cache stage")
        meta = json.loads(meta_path.read_text())
        parts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for c in range(meta["chunks"]):
            with safe_open(chunk_path(root, c), framework="pt") as f:
                captions = f.metadata()
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    size, field = key.split("/")
                    parts[size][field].append(f.get_tensor(key))
                for size in {k.split("/")[0] for k in f.keys()}:  # noqa: SIM118
                    parts[size]["captions"].append(json.loads(captions[f"captions/{size}"]))
        buckets = []
        for size, p in sorted(parts.items()):
            w, h = (int(v) for v in size.split("x"))
            buckets.append(Bucket((w, h), torch.cat(p["latents"]), torch.cat(p["txt"]), torch.cat(p["vec"]),
                                  torch.cat(p["index"]), [c for part in p["captions"] for c in part]))
        with safe_open(Path(root) / PROMPTS_FILE, framework="pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
            txt, vec = f.get_tensor("txt"), f.get_tensor("vec")
        p = meta["ae_params"]
        ae_params = AutoEncoderParams(**{**p, "ch_mult": tuple(p["ch_mult"])})
        return cls(buckets, prompts[1:], txt[1:], vec[1:], txt[:1], vec[:1], (Path(root) / meta["ae"]).resolve(),
                   ae_params, meta.get("scenes"))

    @classmethod
    def concat(cls, caches: list[LatentCache]) -> LatentCache:
        """One cache of all the scenes of `caches` (a data mix; buckets of one image size are joined, so a scene is
        drawn uniformly over all of them: list a cache twice to double its share). They must share the autoencoder
        and the text encoder. The sample-grid prompts are the first one's; `scenes` is None (several sources), so
        per-token loss weights, which re-render the scenes, refuse a mix."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        first = caches[0]
        if len(caches) == 1:
            return first
        for c in caches[1:]:
            if c.ae_root != first.ae_root or c.ae_params != first.ae_params:
                raise ValueError(f"caches to mix must share the autoencoder: {first.ae_root} vs {c.ae_root}")
            if c.empty_txt.shape != first.empty_txt.shape or not torch.equal(c.empty_txt, first.empty_txt):
                raise ValueError("caches to mix must share the text encoder and sequence length (their empty-prompt "
                                 "states differ)")
        parts: dict[tuple[int, int], list[Bucket]] = defaultdict(list)
        for c in caches:
            for b in c.buckets:
                parts[b.size].append(b)
        buckets = [Bucket(size, torch.cat([b.latents for b in bs]), torch.cat([b.txt for b in bs]),
                          torch.cat([b.vec for b in bs]), torch.cat([b.index for b in bs]),
                          [c for b in bs for c in b.captions]) for size, bs in sorted(parts.items())]
        return cls(buckets, first.prompts, first.prompt_txt, first.prompt_vec, first.empty_txt, first.empty_vec,
                   first.ae_root, first.ae_params, None)

    def __len__(self) -> int:
        return sum(len(b) for b in self.buckets)

    def draw(self, batch: int, gen: torch.Generator, rank: int = 0, world: int = 1) -> tuple[Bucket, Tensor]:
        """A bucket and `batch` rows of it from this rank's shard (see `draw_rows`)."""
        which, rows = draw_rows([len(b) for b in self.buckets], batch, gen, rank, world)
        return self.buckets[which], rows

    def load_ae(self, device: torch.device | str = "cpu") -> AutoEncoder:
        ae = load_trained_ae(self.ae_root, device)
        if ae.params != self.ae_params:
            raise ValueError(f"the autoencoder at {self.ae_root} changed since this cache was built; rebuild the cache")
        return ae



def draw_rows(lengths: list[int], batch: int, gen: torch.Generator, rank: int = 0,
              world: int = 1) -> tuple[int, Tensor]:
    """Bucketed sampling: a bucket (probability proportional to its rows in this rank's shard) and `batch` distinct
    rows of it from the shard (rows rank, rank + world, ...); with replacement only if the shard is too small."""
    shards = torch.tensor([float(len(range(rank, n, world))) for n in lengths])
    if shards.sum() == 0:
        raise ValueError(f"no rows for rank {rank} of {world} (bucket sizes {lengths})")
    which = int(torch.multinomial(shards, 1, generator=gen))
    shard = int(shards[which])
    picks = torch.randperm(shard, generator=gen)[:batch] if shard >= batch else \
        torch.randint(shard, (batch,), generator=gen)
    return which, picks * world + rank
