"""Import path of the first release for the detection helpers; they live in `visualad_hf.inference` now and the
`visualad detect` command in `visualad_hf.commands.detect`."""

from .inference import DetectionRecord, InputFile, build_detector, find_images, write_results

__all__ = ["DetectionRecord", "InputFile", "build_detector", "find_images", "write_results"]
