from setuptools import setup

setup(
    name="quietstar-kernels",
    version="0.1.0",
    description="Quiet-STaR training with Triton kernels for thought attention and the fused LM head",
    packages=["kernels", "quietstar"],
    package_data={"quietstar": ["data/*"]},
    python_requires=">=3.10",
    # Ranges admit both the CPU build here (torch 2.13.0) and the GPU machine's torch 2.11;
    # scripts/setup.sh installs torch==2.13.0 first where there is none (an open range would pull
    # a multi-GB CUDA build).
    install_requires=[
        "torch>=2.11,<2.14",
        "triton==3.6.0",
        "transformers>=5.17,<5.18",
        "pyarrow>=14",        # CommonsenseQA (quietstar-eval) is an Arrow file
        "numpy<2.4",          # triton 3.6's interpreter fails on runtime loop bounds with numpy>=2.4
        "einops>=0.8",
        "tqdm>=4.66",
        "tokenizers>=0.22",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "gguf==0.19.0",       # reads the SmolLM2 GGUF (pure Python)
    ],
    extras_require={
        # pytest-xdist / pytest-timeout: the GPU suite's test stage (and its CPU rehearsal) uses both
        "dev": ["pytest>=8", "pytest-xdist==3.8.0", "pytest-timeout==2.4.0", "triton-viz==3.0", "matplotlib>=3.8"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["quietstar-train=quietstar.train:main",
                                      "quietstar-generate=quietstar.generate:main",
                                      "quietstar-eval=quietstar.evaluate:eval_main"]},
)
