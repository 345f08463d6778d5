"""What `cpm-predict` reads: image files, folders, globs and videos turned into two ordered lists,
and each output's file name.

A folder contributes its image and video files (by suffix, not recursive), a glob the image and
video files it matches; a file named on the command line is taken as it is (an image unless its
suffix is a video's). A video that OpenCV cannot open is bad input, found before any work.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass
class Inputs:
    images: list[Path] = field(default_factory=list)
    videos: list[Path] = field(default_factory=list)


def is_media(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES + VIDEO_SUFFIXES


def files_of(text: str) -> list[Path]:
    """The files one command-line input stands for; bad input names it."""
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if is_media(p))
        if not files:
            suffixes = ", ".join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)
            raise UsageError(f"folder {path} holds no image or video files ({suffixes})")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(text):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if is_media(p))
        if not files:
            raise UsageError(f"{text} matches no image or video files")
        return files
    raise FileNotFoundError(f"image {path} does not exist")


def expand_inputs(texts: list[str]) -> Inputs:
    """Images and videos in the order given, each file once; every video opened once to check it."""
    inputs, seen = Inputs(), set()
    for text in texts:
        for path in files_of(text):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            if path.suffix.lower() in VIDEO_SUFFIXES:
                open_video(path).release()
                inputs.videos.append(path)
            else:
                inputs.images.append(path)
    return inputs


def open_video(path: Path):
    """An opened cv2.VideoCapture; UsageError naming the file when OpenCV cannot open it."""
    import cv2

    # FFmpeg's own log lines ("moov atom not found") would repeat our one-line error in its words;
    # quiet (AV_LOG_QUIET) unless the user asked for a level. Read by OpenCV at each open.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise UsageError(f"video {path} could not be opened (OpenCV reads MP4, AVI, MOV, MKV, WebM ... "
                         "with the codecs of its FFmpeg build)")
    return capture


def output_names(paths: list[Path], taken: set[str]) -> list[str]:
    """A file stem per input, unique within one output folder: a second 'a.jpg' from another
    folder becomes 'a-2'. `taken` is updated."""
    names = []
    for path in paths:
        name, count = path.stem, 1
        while name in taken:
            count += 1
            name = f"{path.stem}-{count}"
        taken.add(name)
        names.append(name)
    return names
