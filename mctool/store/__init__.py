"""The artifact store: the only place that reads or writes HDF5 (layout in docs/format.md).

Every read checks what it returns (types, shapes, dtypes, ranges, agreement between groups)
and refuses a malformed or hostile file with one line naming the file and the field; every
write is atomic as seen by a reader (store/files.py says how).
"""

from mctool.store.artifacts import Buffer, SynsetFile, open_buffer, open_synsets
from mctool.store.convex import (STRATEGIES, ConvexInfo, ConvexMeta, complete, create_convex, drop_convex,
                                 read_convex_meta, write_convex_row)
from mctool.store.experts import (ExpertRows, ExpertsInfo, ExpertsReference, RowLayout, copy_without_trajectories,
                                  create_buffer, final_accuracy, regrow, rows_ready)
from mctool.store.files import (FORMAT, FORMAT_VERSION, append, check_writable, clean_text, contents, create,
                                ensure_free_space, holding, now_iso, open_artifact, provenance, refuse_link,
                                require_group, rewrite, shown, temporaries, versions, write_atomically)
from mctool.store.meta import DatasetMeta, read_dataset, read_model, write_dataset, write_model
from mctool.store.summary import summarize
from mctool.store.synsets import (BestImages, Checkpoint, Synset, add_evaluations, check_queue, class_major_labels,
                                  image_classes,
                                  save_synset, synset_names)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "STRATEGIES", "BestImages", "Buffer", "Checkpoint", "ConvexInfo", "ConvexMeta",
    "DatasetMeta", "ExpertRows", "ExpertsInfo", "ExpertsReference", "RowLayout", "Synset", "SynsetFile",
    "add_evaluations", "append", "check_queue", "check_writable", "class_major_labels", "clean_text", "complete", "contents",
    "copy_without_trajectories", "create", "create_buffer",
    "create_convex", "drop_convex", "ensure_free_space", "final_accuracy", "holding", "image_classes", "now_iso",
    "open_artifact", "open_buffer",
    "open_synsets", "provenance", "read_convex_meta", "read_dataset", "read_model", "refuse_link", "regrow",
    "require_group",
    "rewrite", "rows_ready", "save_synset", "shown", "summarize", "synset_names", "temporaries", "versions", "write_convex_row",
    "write_atomically", "write_dataset", "write_model",
]
