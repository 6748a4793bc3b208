"""The data plane (pipeline layer): object storage, manifests, decoding and Ray Data datasets of crops.

Ray-free pieces (``decode``, ``storage``, ``manifest``, ``transforms``, ``config``) import without Ray; ``dataset``
and ``ledger`` use it.
"""

from pipelines.data.config import DataConfig

__all__ = ["DataConfig"]
