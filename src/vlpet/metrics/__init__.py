"""Evaluation metrics (spec §5): VQA accuracy, GQA / NLVR2 / video-QA accuracy, caption metrics.

Caption metrics import pycocoevalcap lazily (``pip install 'vlpet[demo]'``).
"""

from .captions import (
    CAPTION_METRICS,
    DEFAULT_CAPTION_METRICS,
    caption_scores,
    group_references,
    java_available,
    simple_tokenize,
    tokenize_captions,
    video_caption_scores,
)
from .classification import gqa_accuracy, nlvr2_group_id, nlvr2_scores, parse_choice, video_qa_accuracy
from .summary import format_score, markdown_header, summarize_row
from .vqa import (
    AnnotationFormatError,
    VQAAnnotations,
    load_vqa_annotations,
    normalize_vqa_answer,
    parse_vqa_annotations,
    vqa_accuracy,
    vqa_question_accuracy,
    vqa_topk_score,
)

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "AnnotationFormatError",
    "VQAAnnotations",
    "caption_scores",
    "format_score",
    "gqa_accuracy",
    "group_references",
    "java_available",
    "load_vqa_annotations",
    "markdown_header",
    "nlvr2_group_id",
    "nlvr2_scores",
    "normalize_vqa_answer",
    "parse_choice",
    "parse_vqa_annotations",
    "simple_tokenize",
    "summarize_row",
    "tokenize_captions",
    "video_caption_scores",
    "video_qa_accuracy",
    "vqa_accuracy",
    "vqa_question_accuracy",
    "vqa_topk_score",
]
