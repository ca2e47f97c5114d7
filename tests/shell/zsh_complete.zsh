# zsh -f zsh_complete.zsh SCRIPT LINE: the matches zsh's completion offers for LINE, one a
# line (tests/test_completion.py). An interactive zsh in a pseudo-terminal loads SCRIPT with
# compinit and completes LINE with the real completion system; compadd is wrapped to print
# each match it adds, between two NUL lines, and the shell exits once it has completed.
# (The technique of Valodim's zsh-capture-completion.)
zmodload zsh/zpty
zpty z zsh -f -i
setup=$(mktemp)
cat >$setup <<'SETUP'
PROMPT=
autoload -Uz compinit && compinit -u -D
bindkey '^I' complete-word
_capture_mark() { print -r -- $'\0' }
compprefuncs=(_capture_mark)
comppostfuncs=(_capture_mark exit)
zstyle ':completion:*' list-grouped false
zstyle ':completion:*' insert-tab false
compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
  local -a _hits
  builtin compadd -A _hits "$@"
  local hit
  for hit in $_hits; do print -r -- "$hit"; done
}
SETUP
zpty -w z "source ${(q)setup}; source ${(q)1}; echo ok"
repeat 20; do zpty -r z line; [[ $line == ok* ]] && break; done
rm -f $setup
zpty -w z "$2"$'\t'
integer marks=0
while zpty -r z line; do
  if [[ $line == *$'\0'* ]]; then
    (( marks++ )) && break
    continue
  fi
  line=${${line//$'\r'}%$'\n'}
  (( marks )) && [[ -n $line ]] && print -r -- $line
done
zpty -d z
