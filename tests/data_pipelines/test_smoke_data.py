import pytest
import torch

from tandem.data_pipelines.blends import Phase, PretrainDataConfig, build_pretrain_datasets
from tandem.data_pipelines.packing import PackingStats, build_dataloader
from tandem.data_pipelines.preprocess import preprocess
from tandem.data_pipelines.smoke_data import write_smoke_corpus


@pytest.mark.slow
def test_tiny_model_learns_from_the_preprocessed_smoke_corpus(tmp_path, tok):
    """End to end: corpus → tandem-preprocess → phased blend → DataLoader → HybridLM; the loss falls."""
    from tandem.model import HybridConfig, HybridLM

    corpus = write_smoke_corpus(tmp_path / "corpus.jsonl", n_docs=400)
    res = preprocess(corpus, tmp_path / "data" / "smoke", progress=False, log=lambda *_: None)
    assert res.documents == 400
    cfg = PretrainDataConfig([Phase("main", {res.prefix: 1.0})], seq_length=64, cache_dir=str(tmp_path / "c"))
    data = build_pretrain_datasets(cfg, tok, train_samples=8 * 12)
    model = HybridLM(HybridConfig.preset("tiny"), init_seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    stats, losses = PackingStats(), []
    for batch in build_dataloader(data.train, 8, eod=tok.eod):
        stats.update(batch)
        logits = model(batch["input_ids"], seq_idx=batch["seq_idx"])
        per_tok = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        loss = (per_tok * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(losses) == 12
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.5 and last < first - 1.2, losses
    assert stats.fill_rate == 1.0 and stats.as_dict()["data/docs_per_row"] > 1
