"""The `flywheel publish` config: how an adapter becomes an Ollama-ready folder (`flywheel.training.export`)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from flywheel.foundation.config import StageConfig


class PublishConfig(StageConfig):
    out: Optional[str] = Field(None, description="output folder; default Modelfiles/<model name or run id>")
    force: bool = Field(False, description="replace an existing `out` Flywheel did not write")
    name: Optional[str] = Field(None, description="Ollama model name; default the registered name, lower-cased")
    system: Optional[str] = Field(None, description="SYSTEM text; overrides the winning prompt variant's system "
                                  "prompt")
    mode: Literal["merged", "adapter"] = Field("merged", description="one merged model.gguf, or base.gguf + "
                                               "ADAPTER (older Ollama)")
    quantize: str = Field("f16", description="GGUF type convert_hf_to_gguf.py writes: f16, bf16 or q8_0")
    base: Literal["gguf", "ollama"] = Field("gguf", description="mode=adapter: FROM ./base.gguf (exact weights) "
                                            "or an Ollama model")
    ollama_base: str = Field("smollm2:135m", description="FROM for `base: ollama` (and the adapter-mode "
                             "fallback)")
    gguf_adapter: bool = Field(True, description="mode=adapter: convert the adapter with convert_lora_to_gguf.py")
    llama_cpp_dir: Optional[str] = Field(None, description="llama.cpp converters; default $FLYWHEEL_LLAMA_CPP or "
                                         "<venv>/share/flywheel/llama.cpp")
    convert_timeout_s: int = Field(900, gt=0, description="seconds one GGUF conversion may take")
    parameters: Optional[dict[str, Any]] = Field(None, description=(
        "Modelfile PARAMETER lines; default (null): exactly the sampling `flywheel eval` evaluated with, every "
        "parameter pinned (temperature 0, top_k 1, repeat_penalty 1, seed, num_predict), plus num_ctx 2048"))
    license: str = Field("Apache-2.0. Base model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0). "
                         "LoRA adapter trained by Flywheel on the logs named in README.md.",
                         description="Modelfile LICENSE text")
    model_cache: Optional[str] = Field(None, description="where dequantized base models are cached")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or "
                                        "the project store")
    run_name: Optional[str] = Field(None, description="MLflow run name; default generated")

    @field_validator("quantize")
    @classmethod
    def _converter_type(cls, v: str) -> str:
        from flywheel.training.export import ExportError, check_outtype

        try:
            return check_outtype(v)
        except ExportError as e:
            raise ValueError(str(e).removeprefix("quantize: ")) from None
