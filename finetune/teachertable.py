"""The teacher's precomputed embeddings read from a file on disk, as a Caffe Python layer.

    layer { name: "teacher/fc5" type: "Python" bottom: "label" top: "teacher/fc5"
            python_param { module: "finetune.teachertable" layer: "TeacherTable"
                           param_str: '{"path": "/run/teacher_table.npy"}' } }

The list's label of an image is its row; the layer hands on that row of an
N x D float32 ``.npy`` file opened memory-mapped, so only the rows of the
batch are read and the table is never a parameter of the net: snapshots and
the final caffemodel hold the student alone, and a long table costs the page
cache, not the process.  Caffe's labels are float32, exact for rows below
2^24 (16.7M; MS1M has 5.8M images).  The label bottom gets no gradient.
"""
import os

import numpy as np

import caffe

from base.errors import ToolkitError

from .layerparams import json_params

DEFAULTS = {"path": None}


class TeacherTableError(ToolkitError):
    pass


def open_table(path):
    """The N x D float32 table at ``path``, memory-mapped read-only."""
    try:
        table = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise TeacherTableError("teacher table %s cannot be read: %s" % (path, e)) from None
    if table.ndim != 2 or table.dtype != np.float32:
        raise TeacherTableError("teacher table %s is %s %s; an N x D float32 array is needed"
                                % (path, table.dtype, "x".join(map(str, table.shape))))
    return table


def rows(table, labels):
    """The table's rows for a batch of labels (row numbers), refused when one is out of range."""
    index = np.asarray(labels).reshape(-1).astype(np.int64)
    bad = index[(index < 0) | (index >= len(table))]
    if bad.size:
        raise TeacherTableError("label %d is no row of the teacher table (%d rows): the list is not the one the "
                                "table was made for" % (bad[0], len(table)))
    return np.asarray(table[index])      # a memory map reads just these rows


class TeacherTable(caffe.Layer):
    def setup(self, bottom, top):
        self.p = json_params(self.param_str, DEFAULTS, "TeacherTable", TeacherTableError)
        if len(bottom) != 1 or len(top) != 1:
            raise TeacherTableError("TeacherTable takes the label bottom and gives one top")
        if not self.p["path"] or not os.path.isfile(self.p["path"]):
            raise TeacherTableError("TeacherTable: no table file %r" % self.p["path"])
        self.table = open_table(self.p["path"])

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].num, self.table.shape[1])

    def forward(self, bottom, top):
        top[0].data[...] = rows(self.table, bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        pass        # the label is no variable
