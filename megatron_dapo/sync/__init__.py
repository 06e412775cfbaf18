"""Weight sync from the Megatron actor to the rollout engines (disk / distributed / tensor transports)."""
from .bucketing import bucket_bytes_from_mb, iter_buckets, resolve_dtype
from .metrics import rollout_logprob_mismatch
from .transports import TRANSPORTS, WeightSyncError
from .weight_sync import WeightSync

__all__ = ["TRANSPORTS", "WeightSync", "WeightSyncError", "bucket_bytes_from_mb", "iter_buckets",
           "resolve_dtype", "rollout_logprob_mismatch"]
