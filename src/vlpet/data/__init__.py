"""Image-text data in the VL-Adapter layout and video-text data in the VALUE layout (``video.py``):
readers, datasets, the multi-task sampler, fixtures.

Quick start::

    from vlpet.data import TASKS, build_dataset, TaskBatchLoader, MultitaskLoader, task_batch_sizes

    sizes = task_batch_sizes(500)                       # vqa 500, gqa 833, nlvr 166, caption 416
    loaders = {t: TaskBatchLoader(build_dataset(t, "train", root, tok, seed=42), sizes[t], seed=42)
               for t in TASKS}
    mt = MultitaskLoader(loaders, seed=42)
    for batch in mt: ...                                # one task per batch; mt.state_dict() resumes
"""

from .datasets import (
    BATCH_KEYS,
    CaptionDataset,
    ImageTextDataset,
    NLVR2Dataset,
    QADataset,
    best_answer,
    build_dataset,
    collate,
    example_seed,
    sample_answer,
)
from .errors import DataError
from .features import (
    GRID_TOKENS,
    FeatureDir,
    read_h5_features,
    read_npz_video,
    write_h5_features,
    write_npz_video,
)
from .fixtures import ImageTextFixture, make_image_text_fixture
from .layout import DEFAULT_FEATURE_DIRNAME, VLAdapterLayout, resolve_data_root
from .records import (
    CocoImage,
    GQARecord,
    NLVR2Record,
    VQAAnnotation,
    VQARecord,
    load_json,
    nlvr_consistency_key,
    read_ans2label,
    read_coco_karpathy,
    read_gqa,
    read_label2ans,
    read_nlvr2,
    read_vqa,
    read_vqa_annotations,
)
from .sampler import MultitaskLoader, MultitaskSampler, TaskBatchLoader, TaskStep, task_batch_sizes
from .tasks import (
    TASKS,
    VIDEO_TASKS,
    Task,
    TaskSpec,
    canonical_task,
    class_token_ids,
    get_task_spec,
    get_task_specs,
    is_video_task,
    register_task,
    task_entry,
    task_modality,
    task_names,
)
from .video import (
    VideoCaptionDataset,
    VideoQADataset,
    build_video_dataset,
    read_subtitles,
    read_video_captions,
    read_video_qa,
    resize_frames,
    video_input_text,
    write_value_predictions,
)
from .video_fixtures import VideoFixture, make_video_fixture

__all__ = [
    "BATCH_KEYS", "CaptionDataset", "ImageTextDataset", "NLVR2Dataset", "QADataset", "best_answer",
    "build_dataset", "collate", "example_seed", "sample_answer",
    "DataError",
    "GRID_TOKENS", "FeatureDir", "read_h5_features", "read_npz_video", "write_h5_features", "write_npz_video",
    "ImageTextFixture", "make_image_text_fixture",
    "DEFAULT_FEATURE_DIRNAME", "VLAdapterLayout", "resolve_data_root",
    "CocoImage", "GQARecord", "NLVR2Record", "VQAAnnotation", "VQARecord", "load_json", "nlvr_consistency_key",
    "read_ans2label", "read_coco_karpathy", "read_gqa", "read_label2ans", "read_nlvr2", "read_vqa",
    "read_vqa_annotations",
    "MultitaskLoader", "MultitaskSampler", "TaskBatchLoader", "TaskStep", "task_batch_sizes",
    "TASKS", "TaskSpec", "canonical_task", "class_token_ids", "get_task_spec", "get_task_specs",
    "Task", "register_task", "task_names", "task_entry", "is_video_task", "task_modality",
    "VIDEO_TASKS", "VideoCaptionDataset", "VideoQADataset", "build_video_dataset", "read_subtitles",
    "read_video_captions", "read_video_qa", "resize_frames", "video_input_text", "write_value_predictions",
    "VideoFixture", "make_video_fixture",
]
