"""The run package owns every directory sidrec trains into: the file names (`layout`), what each
stage was made from (`fingerprint`), a trained run's reader and writer (`RunDir`), a `sidrec run`
directory (`PipelineDir`) and a run's catalogue versions (`catalog`). No other module joins a
run's file names to paths."""

from sidrec.errors import NonBijectiveWarning
from sidrec.provenance import environment
from sidrec.run import catalog, layout
from sidrec.run.fingerprint import (ADDED_KEYS, RESUME_FREE, array_digest, changed_keys, codebook_inputs,
                                    data_inputs, digest, dir_fingerprint, file_digest, marker_fields, model_inputs,
                                    stage_status)
from sidrec.run.layout import eval_file
from sidrec.run.rundir import PipelineDir, RunDir, check_claim

__all__ = ["RunDir", "PipelineDir", "NonBijectiveWarning", "digest", "array_digest", "file_digest", "data_inputs",
           "codebook_inputs", "model_inputs", "changed_keys", "stage_status", "dir_fingerprint", "marker_fields",
           "eval_file", "RESUME_FREE", "ADDED_KEYS", "check_claim", "catalog", "layout", "environment"]
