"""Leaderboard submissions (GLUE TSV, SuperGLUE JSONL, zipped), their validator, predictions on new inputs."""

from speclora.submission.formats import LEADERBOARD_FILES, LeaderboardFile
from speclora.submission.inputs import InputPredictionWriter, predict_jsonl, read_inputs
from speclora.submission.validate import validate_submission
from speclora.submission.writer import SubmissionWriter, write_submission

__all__ = [
    "LEADERBOARD_FILES",
    "InputPredictionWriter",
    "LeaderboardFile",
    "SubmissionWriter",
    "predict_jsonl",
    "read_inputs",
    "validate_submission",
    "write_submission",
]
