// Sideways scrolling that shows itself: when a box is wider than its frame (the stage map on a
// narrow screen), the frame gets data-overflow = left | right | both | none, which style.css
// turns into a fade on each side with more to see, and a hint line says how to reach the rest.
// The scroller also keeps a visible scrollbar (style.css) and takes arrow keys once focused.

import { setText } from "./util.js";

/** Keep `frame.dataset.overflow` and `hint` in step with `scroller`'s horizontal position. */
export function watchSideScroll(frame, scroller, hint, describe) {
  const update = () => {
    const max = scroller.scrollWidth - scroller.clientWidth;
    const left = max > 1 && scroller.scrollLeft > 1;
    const right = max > 1 && scroller.scrollLeft < max - 1;
    const overflow = left && right ? "both" : left ? "left" : right ? "right" : "none";
    if (frame.dataset.overflow !== overflow) frame.dataset.overflow = overflow;
    hint.hidden = overflow === "none";
    if (!hint.hidden) setText(hint, describe(overflow));
  };
  scroller.addEventListener("scroll", update, { passive: true });
  new ResizeObserver(update).observe(scroller);
  return update;
}
