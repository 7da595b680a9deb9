"""Training data: readers, formats, tokenisation with loss masks, packing, preference pairs.

`SFTDataset(DataConfig(path=...), tokenizer)` reads and tokenises supervised fine-tuning data
at once (see `postax.data.dataset` for why and for the batch layout); `dataset.iterator()`
yields `Batch`es over epochs and can be saved and restored.

`PreferenceDataset(PreferenceDataConfig(path=..., kind=...), tokenizer)` does the same for
preference data: prompt/chosen/rejected pairs (DPO, IPO, ORPO, SimPO) or unpaired labelled
examples with KTO's mismatched KL rows (see `postax.data.preference` for the batch layout).
Both read the same sources and share the resumable `DataIterator`.

Not built on grain: the documents already sit in host memory as flat numpy arrays, so a batch
is a gather of a few slices and needs no worker processes, prefetching or file-level random
access, which are what grain offers. Its packers fill rows on the fly, so row contents and the
number of steps per epoch depend on buffering and are not known up front, and they do not
produce our shifted targets and loss masks or count overlong documents. Resumption here is
two integers. Adding grain would bring array-record, protobuf, cloudpickle, etils and
portpicker for none of that; it becomes the right tool for streaming pretraining-size corpora
that do not fit in memory.
"""

from postax.data.config import DataConfig
from postax.data.dataset import Batch, DataStats, SFTDataset
from postax.data.formats import Document, RecordError
from postax.data.iteration import DataIterator
from postax.data.packing import pack
from postax.data.preference import PreferenceDataset
from postax.data.preference_batches import (
    PreferenceBatch,
    PreferenceStats,
    SharedPromptBatch,
    UnpairedPreferenceBatch,
)
from postax.data.preference_config import PreferenceDataConfig
from postax.data.preference_encode import PreferenceRecordError
from postax.data.sources import DataError, data_files, iter_records

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "DataIterator",
    "DataStats",
    "Document",
    "PreferenceBatch",
    "PreferenceDataConfig",
    "PreferenceDataset",
    "PreferenceRecordError",
    "PreferenceStats",
    "RecordError",
    "SFTDataset",
    "SharedPromptBatch",
    "UnpairedPreferenceBatch",
    "data_files",
    "iter_records",
    "pack",
]
