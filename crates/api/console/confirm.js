// A modal confirmation <dialog> shared by the console's pages: Escape and Cancel close it, focus
// returns to the button that opened it, and it closes when the operator navigates away.

// `ui` lends app.js's `h` and `onCleanup`. `onConfirm` runs when the confirm button is pressed
// (the dialog is closed after it, whether it succeeded or threw; a throw goes to `onError`).
export function confirmDialog(ui, { title, text, confirmLabel = 'Delete', confirmId, opener, onConfirm, onError = () => {} }) {
  const { h } = ui;
  const titleId = `${confirmId}-title`;
  const dialog = h('dialog', { class: 'confirm', 'aria-labelledby': titleId }, h('h2', { id: titleId }, title), h('p', {}, text));
  const cancel = h('button', { type: 'button', class: 'secondary', onclick: () => dialog.close() }, 'Cancel');
  const confirm = h('button', { type: 'button', class: 'danger', id: confirmId, onclick: async () => {
    confirm.disabled = true;
    try {
      await onConfirm();
      dialog.close();
    } catch (e) {
      dialog.close();
      onError(e);
    }
  } }, confirmLabel);
  dialog.append(h('div', { class: 'row' }, cancel, confirm));
  dialog.addEventListener('close', () => { dialog.remove(); opener?.focus(); });
  document.body.append(dialog);
  ui.onCleanup(() => { if (dialog.open) dialog.close(); });
  dialog.showModal();
  cancel.focus();
}
