"""The built-in synthetic visual world: procedural, offline (Pillow only) VLM training and eval data.

    from sailvl.data.synth import generate, generate_splits, sample, TASKS, World

    generate("data/synth", n=10_000, seed=0)                     # data/synth/train.jsonl + images/train/
    generate_splits("data/synth", 50_000, 1_000, 1_000, seed=0)  # train / val / test, disjoint content
    record, images = sample("vqa_color", random.Random(0))       # one sample in memory
    to_sample(record, images)                                    # -> sailvl.data.schema.Sample

Records are LLaVA / InternVL JSONL objects: id, task, answer (exact-match scorable), "image" |
"images" | "video" (paths relative to out_dir), conversations (human / gpt), and meta (the world spec
the answer was computed from). Images hold one `<image>` placeholder per image; videos one `<video>`;
thinking samples reply "<think>\\n...\\n</think>\\n\\nThe answer is \\boxed{7}." with answer "7"; grounding
answers are "[x1, y1, x2, y2]" in 0-1000 coordinates; captions answer with the caption.

Tasks (TASKS): caption, caption_pretrain, vqa_color, vqa_shape, vqa_count, vqa_spatial, vqa_compare,
vqa_yesno, scene_qa, ocr, chart, table, grounding, math_cot, math_direct, multi_change, video_motion,
video_count, text_instruct. Training-only generators (TRAIN_ONLY, accepted by name, never in the default
task list): scene_drill (4-6 of the scene tasks' questions about one scene, one conversation),
text_drill (every value of a chart, every cell of a table, ... about one text image), text_lists
(text_instruct's open-ended kinds: list operations, sequences, comparisons), text_recall (repeats and key
lookups in chat form) and text_induction (plain-text records with no conversations, `{"prompt": ..., "completion":
...}`: random runs written twice and one-token key:value lookups, on which the LLM forms induction heads).

The default `World` (64 px, <= 3 objects of radius 10-17 px, 1-3 large OCR characters, single-digit
addition) is the one CALIBRATION.md found learnable by a tiny ViT on a CPU; its fields are the
difficulty dial for bigger worlds. `World(answer_suffix=False)` drops SAIL-VL2's short-answer instruction
("Answer the question using a single word or phrase.") from the questions.

Modules: world (dial, vocabulary, fonts), scene (objects, layout, drawing, words), render (text,
equations, charts, tables), tasks_scene / tasks_text (generators), registry (TASKS, sample), record
(record shape, to_sample), writer (generate, generate_splits).
"""

from .record import to_sample
from .registry import TASKS, sample
from .world import World
from .writer import content_hash, generate, generate_splits, split_rng

__all__ = ["TASKS", "World", "content_hash", "generate", "generate_splits", "sample", "split_rng", "to_sample"]
