"""Task prompts on disk: the file format, PEFT import and the versioned, watched registry."""

from prompt_store.format import (
    FORMAT_VERSION,
    BaseIdentity,
    PromptFile,
    PromptFormatError,
    dump_prompt,
    load_prompt_bytes,
    load_prompt_file,
    validate_name,
    validate_prompt,
)
from prompt_store.peft_import import import_peft_dir, import_peft_files
from prompt_store.registry import PromptExists, PromptInfo, PromptNotFound, PromptRegistry

__all__ = [
    "FORMAT_VERSION",
    "BaseIdentity",
    "PromptExists",
    "PromptFile",
    "PromptFormatError",
    "PromptInfo",
    "PromptNotFound",
    "PromptRegistry",
    "dump_prompt",
    "import_peft_dir",
    "import_peft_files",
    "load_prompt_bytes",
    "load_prompt_file",
    "validate_name",
    "validate_prompt",
]
