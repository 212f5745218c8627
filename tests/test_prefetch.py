"""The background prefetch thread (jaxformer.data.prefetch): the position it reports, resume, errors."""

from __future__ import annotations

import json
import time

import pytest

from jaxformer.data import DataError
from helpers import assert_same_batches, data_config as config, iterator, m30k, write_pair

pytestmark = pytest.mark.usefixtures("token_cache_dir")  # conftest's: one token cache folder for the data tests


def test_prefetch_reports_the_position_of_the_last_batch_taken(tmp_path, multi30k_dir, multi30k_tokenizer):
    from jaxformer.data import Prefetcher

    cfg = m30k(multi30k_dir, pack=True)
    plain = iterator(cfg, multi30k_tokenizer)
    ahead = Prefetcher(iterator(cfg, multi30k_tokenizer), depth=3)
    for _ in range(7):
        assert_same_batches([next(ahead)], [next(plain)])
    time.sleep(0.3)  # the thread is batches ahead by now
    assert ahead.state_dict() == plain.state_dict()
    resumed = Prefetcher(iterator(cfg, multi30k_tokenizer), depth=3)
    resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
    assert_same_batches([next(resumed) for _ in range(5)], [next(plain) for _ in range(5)])
    ahead.close()
    resumed.close()
    failing = Prefetcher(iterator(config(train_files=write_pair(tmp_path, [""], ["x"])), multi30k_tokenizer, "train"))
    with pytest.raises(DataError, match="no usable examples"):
        next(failing)
