"""Small real inputs for data-pipeline tests: built-in emoji and text in user formats."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_prep.builtin import builtin_text_documents, load_builtin_images


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_inputs(root: Path, n_images: int = 60, n_docs: int = 12, corrupt: bool = True) -> dict:
    """Two tars + one parquet of image–caption pairs, one jsonl + one parquet of text.
    With ``corrupt``, each kind of bad sample appears once."""
    images, captions = load_builtin_images()
    documents = builtin_text_documents()[:n_docs]
    (root / "images").mkdir(parents=True)
    (root / "text").mkdir(parents=True)
    third = n_images // 3
    for t in range(2):
        with tarfile.open(root / "images" / f"part-{t}.tar", "w") as tar:
            for i in range(t * third, (t + 1) * third):
                add_member(tar, f"{i:06d}.png", png_bytes(images[i]))
                if i % 2:
                    add_member(tar, f"{i:06d}.txt", captions[i].encode())
                else:
                    add_member(tar, f"{i:06d}.json", json.dumps({"caption": captions[i]}).encode())
            if corrupt and t == 0:
                add_member(tar, "bad-image.jpg", b"not an image at all")
                add_member(tar, "bad-image.txt", b"a caption")
                add_member(tar, "no-caption.png", png_bytes(images[0]))
                add_member(tar, "latin1.png", png_bytes(images[1]))
                add_member(tar, "latin1.txt", "caf\xe9".encode("latin-1"))
    rows = list(range(2 * third, n_images))
    table = {
        "picture": [{"bytes": png_bytes(images[i]), "path": None} for i in rows],
        "alt": [captions[i] for i in rows],
    }
    if corrupt:
        table["picture"].append({"bytes": png_bytes(images[2]), "path": None})
        table["alt"].append("   ")
    pq.write_table(pa.table(table), root / "images" / "part-2.parquet")
    with open(root / "text" / "docs.jsonl", "wb") as f:
        for text in documents[: n_docs // 2]:
            f.write(json.dumps({"body": text}).encode() + b"\n")
        if corrupt:
            f.write(b'{"body": ""}\n')
            f.write(b"{not json\n")
            f.write(b'{"body": "\xff\xfe broken utf-8"}\n')
    pq.write_table(pa.table({"body": documents[n_docs // 2 :]}), root / "text" / "more.parquet")
    return {"images": images, "captions": captions, "documents": documents}
