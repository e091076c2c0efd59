"""Build hook: install the .pth file that loads _hf_hyperflow_peft_hint, in wheels and editable installs."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class PeftHintHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        files = {"hf_hyperflow_peft_hint.pth": "hf_hyperflow_peft_hint.pth"}
        if version == "editable":
            build_data["force_include_editable"].update(files)
        else:
            build_data["force_include"].update({**files, "_hf_hyperflow_peft_hint.py": "_hf_hyperflow_peft_hint.py"})
