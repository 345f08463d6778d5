"""Where `cpm-predict` puts its records and drawings, and what it counts: JSON per image, JSON
Lines per video (or one line a record on stdout without --out), PNG / MP4 skeletons with --draw,
the progress bar (images/s, on a terminal) and the closing summary."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


class Outputs:
    def __init__(self, out: str | None, draw: bool, maps: str | None, joint_names):
        self.dir = Path(out) if out else None
        self.draw, self.maps, self.joint_names = draw, maps, list(joint_names)
        self.taken: set[str] = set()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def names_for(self, paths: list[Path]) -> list[str]:
        from pipeline.predict_inputs import output_names

        return output_names(paths, self.taken)

    def image(self, path: Path, name: str, image, record: dict, result: dict) -> None:
        if self.dir is None:
            print(json.dumps(record), flush=True)
        else:
            (self.dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        if self.draw:
            import cv2

            from pipeline.figures import skeleton_overlay

            drawn = skeleton_overlay(image, result["joints"], self.joint_names)
            cv2.imwrite(str(self.dir / f"{name}.png"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if self.maps:
            from pipeline.figures import belief_maps_figure

            belief_maps_figure(result["crop"], result["belief_maps"], self.joint_names, self.maps)

    @contextlib.contextmanager
    def video(self, path: Path, fps: float):
        """A stream for one video's frames: DIR/NAME.jsonl (stdout without --out), DIR/NAME.mp4."""
        name = self.names_for([path])[0]
        stream = VideoStream(self, name, fps)
        try:
            yield stream
        finally:
            stream.close()


class VideoStream:
    def __init__(self, outputs: Outputs, name: str, fps: float):
        self.outputs, self.name, self.fps = outputs, name, fps
        self.lines = open(outputs.dir / f"{name}.jsonl", "w") if outputs.dir else sys.stdout  # noqa: SIM115
        self.writer = None

    def write(self, image, record: dict, result: dict) -> None:
        self.lines.write(json.dumps(record) + "\n")
        if self.outputs.draw:
            import cv2

            from pipeline.figures import skeleton_overlay

            if self.writer is None:  # the size of the first frame: OpenCV writes every frame at it
                height, width = image.shape[:2]
                self.writer = cv2.VideoWriter(str(self.outputs.dir / f"{self.name}.mp4"),
                                              cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            drawn = skeleton_overlay(image, result["joints"], self.outputs.joint_names)
            self.writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.lines is not sys.stdout:
            self.lines.close()
        else:
            self.lines.flush()
        if self.writer is not None:
            self.writer.release()


@dataclass
class Tally:
    """Counts and time of one command: images and frames predicted, files skipped (with why)."""

    start: float
    images: int = 0
    frames: int = 0
    skipped: list[str] = field(default_factory=list)
    bar: object = None

    @property
    def predicted(self) -> int:
        return self.images + self.frames

    def read(self, path: Path, error: str | None) -> bool:
        """True when the file was read; else it is counted as skipped, with the reason."""
        if error is not None:
            self.skipped.append(error)
        return error is None

    def advance(self, steps: int, images: int = 0, frames: int = 0) -> None:
        self.images += images
        self.frames += frames
        if self.bar is not None:
            self.bar.update(steps)

    @contextlib.contextmanager
    def progress(self, inputs, quiet: bool):
        """A bar with images/s on a terminal (frames counted from each video's header)."""
        import cv2
        from tqdm import tqdm

        from pipeline.predict_inputs import open_video

        if quiet or not sys.stderr.isatty():
            yield
            return
        total = len(inputs.images)
        for path in inputs.videos:
            capture = open_video(path)
            total += max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
            capture.release()
        with tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True) as self.bar:
            yield
        self.bar = None

    def skipped_text(self) -> str:
        return "; ".join(self.skipped)

    def summary(self, predictor) -> str:
        seconds = time.perf_counter() - self.start
        rate = self.predicted / seconds if seconds > 0 else 0.0
        line = (f"predicted {self.images} image(s) and {self.frames} video frame(s) in {seconds:.1f} s "
                f"({rate:.1f} images/s) on {predictor.device}, batch {predictor.batch_size}")
        if self.skipped:
            line += f"; skipped {len(self.skipped)} unreadable file(s): {self.skipped_text()}"
        return line
