"""The Continuous Thought Machine model: config, presets, module and its parts."""
