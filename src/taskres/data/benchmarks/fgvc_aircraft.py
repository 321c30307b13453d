"""FGVCAircraft, read as CoOp's ``datasets/fgvc_aircraft.py`` reads the dataset's own text files.

``fgvc_aircraft/`` is the ``data/`` folder of fgvc-aircraft-2013b. Class names are the stripped lines of
``variants.txt`` and the label of a class is its line number (0-based). Each line of
``images_variant_{train,val,test}.txt`` is ``<image id> <variant>``: split on single spaces, the image is
``images/<image id>.jpg`` and the class name is the rest joined by single spaces (variants such as "Cessna 172"
contain spaces). Entry order is line order.
"""

from __future__ import annotations

from pathlib import Path

from taskres.data.benchmarks._base import BenchmarkSpec, Parts, Published, read_text_lines
from taskres.data.splits import Entry
from taskres.errors import TaskResValueError

_SPLIT_FILES = {split: f"images_variant_{split}.txt" for split in ("train", "val", "test")}


def read_fgvc_aircraft(spec: BenchmarkSpec, dataset_dir: Path) -> Parts:
    variants_file = dataset_dir / "variants.txt"
    classnames = tuple(read_text_lines(spec, variants_file))
    cname2lab: dict[str, int] = {}
    for label, cname in enumerate(classnames):
        if cname2lab.setdefault(cname, label) != label:
            raise TaskResValueError(
                f"dataset {spec.name!r}: variant {cname!r} appears twice in "
                f"{str(variants_file)!r}; "
                "each variant must be listed once."
            )
    splits: dict[str, tuple[Entry, ...]] = {}
    for split, filename in _SPLIT_FILES.items():
        path = dataset_dir / filename
        entries = []
        for n, line in enumerate(read_text_lines(spec, path), start=1):
            parts = line.split(" ")
            cname = " ".join(parts[1:])
            if cname not in cname2lab:
                raise TaskResValueError(
                    f"dataset {spec.name!r}: {str(path)!r} line {n} names variant {cname!r}, which "
                    f"{str(variants_file)!r} does not list; the two files come from the same archive: re-extract it."
                )
            entries.append(Entry(parts[0] + ".jpg", cname2lab[cname], cname))
        splits[split] = tuple(entries)
    return Parts(dataset_dir / "images", splits["train"], splits["val"], splits["test"], classnames)


# Layout and reading: CoOp datasets/fgvc_aircraft.py; template: docs/protocol.md#base-classifier; counts: CoOp paper.
SPEC = BenchmarkSpec(
    name="fgvc_aircraft",
    coop_class="FGVCAircraft",
    dataset_dir="fgvc_aircraft",
    image_dir="images",
    split_source="variants.txt + images_variant_{train,val,test}.txt",
    required=(("images", "image folder"), ("variants.txt", "class-name file"))
    + tuple((f, "split file") for f in _SPLIT_FILES.values()),
    templates=("a photo of a {}, a type of aircraft.",),
    published=Published(100, 3334, 3333, 3333),
    download="download fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/, "
    "extract it, keep only its data/ folder and rename that folder to {dir} (giving {dir}/images/, "
    "{dir}/variants.txt and {dir}/images_variant_{{train,val,test}}.txt)",
    reader=read_fgvc_aircraft,
)
