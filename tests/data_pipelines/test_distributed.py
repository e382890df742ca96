"""Two gloo ranks build the same schedule (megatron: rank 0 builds the index cache, the other loads it)
and each reads its data-parallel shard; together they read exactly the single-process global order."""

import json
import multiprocessing as mp
import os

import pytest

from dp_helpers import write_indexed


def _rank_main(rank, world, init_file, cfg_kw, out_dir, consumed):
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from tandem.data_pipelines.blends import Phase, PretrainDataConfig, build_pretrain_datasets
    from tandem.data_pipelines.packing import build_dataloader
    from tandem.data_pipelines.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = load_tokenizer()
        phases = [Phase(n, b, f) for n, b, f in cfg_kw.pop("phases")]
        data = build_pretrain_datasets(PretrainDataConfig(phases, **cfg_kw), tok, train_samples=200)
        loader = build_dataloader(data.train, 2, eod=tok.eod, consumed_samples=consumed, dp_rank=rank, dp_size=world)
        rows = [b["input_ids"].tolist() for _, b in zip(range(10), loader)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rows": rows, "fingerprint": data.fingerprint()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_share_the_schedule(tmp_path, tok):
    a = write_indexed(tmp_path / "a", 500, 3, 200, seed=0)
    b = write_indexed(tmp_path / "b", 500, 200, 512, seed=1)
    phases = [("p1", {a: 0.5, b: 0.5}, 0.5), ("p2", {b: 1.0}, 0.5)]
    cfg_kw = {"phases": phases, "seq_length": 24, "cache_dir": str(tmp_path / "cache")}
    ctx = mp.get_context("spawn")
    consumed = 80  # resume mid-run on both ranks; crosses the switch at 100 within 10 steps
    procs = [ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "init"), dict(cfg_kw), str(tmp_path), consumed))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["fingerprint"] == res[1]["fingerprint"]

    from tandem.data_pipelines.blends import Phase, PretrainDataConfig, build_pretrain_datasets

    cfg = PretrainDataConfig([Phase(*p) for p in phases], seq_length=24, cache_dir=str(tmp_path / "cache"))
    single = build_pretrain_datasets(cfg, tok, train_samples=200).train
    for step in range(10):
        for r in range(2):
            for k in range(2):
                i = consumed + step * 4 + r * 2 + k
                assert res[r]["rows"][step][k] == single[i]["tokens"].tolist(), (step, r, k)
